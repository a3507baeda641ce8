"""Detectron2's ``DatasetCatalog`` and ``MetadataCatalog``."""

from __future__ import annotations

from collections import UserDict
from typing import Any, Callable, List

__all__ = ["DatasetCatalog", "MetadataCatalog", "Metadata"]


class _DatasetCatalog(UserDict):
    """name -> a function returning the dataset's list of dicts. ``get`` calls the function every time."""

    def register(self, name: str, func: Callable[[], List[dict]]) -> None:
        assert callable(func), "You must register a function with `DatasetCatalog.register`!"
        assert name not in self, "Dataset '{}' is already registered!".format(name)
        self[name] = func

    def get(self, name: str) -> List[dict]:
        try:
            f = self[name]
        except KeyError as e:
            raise KeyError(
                "Dataset '{}' is not registered! Available datasets are: {}".format(name, ", ".join(list(self.keys())))
            ) from e
        return f()

    def list(self) -> List[str]:
        return list(self.keys())

    def remove(self, name: str) -> None:
        self.pop(name)

    def __str__(self) -> str:
        return "DatasetCatalog(registered datasets: {})".format(", ".join(self.keys()))

    __repr__ = __str__


DatasetCatalog = _DatasetCatalog()


class Metadata:
    """Attributes of a dataset. Setting an existing attribute to a different value is an error, as in
    Detectron2, because metadata is global and shared by every user of the dataset name."""

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__["name"] = kwargs.pop("name", "N/A")
        self.set(**kwargs)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        raise AttributeError(
            "Attribute '{}' does not exist in the metadata of dataset '{}'. Available keys are {}.".format(
                key, self.__dict__["name"], str(self.__dict__.keys())
            )
        )

    def __setattr__(self, key: str, val: Any) -> None:
        try:
            oldval = self.__dict__[key]
        except KeyError:
            self.__dict__[key] = val
            return
        assert oldval == val, (
            "Attribute '{}' in the metadata of '{}' cannot be set to a different value!\n{} != {}".format(
                key, self.__dict__["name"], oldval, val
            )
        )

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def set(self, **kwargs: Any) -> "Metadata":
        for k, v in kwargs.items():
            setattr(self, k, v)
        return self

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            return default


class _MetadataCatalog(UserDict):
    """name -> Metadata, created on first access."""

    def get(self, name: str) -> Metadata:
        assert len(name)
        r = super().get(name, None)
        if r is None:
            r = self[name] = Metadata(name=name)
        return r

    def list(self) -> List[str]:
        return list(self.keys())

    def remove(self, name: str) -> None:
        self.pop(name)


MetadataCatalog = _MetadataCatalog()
