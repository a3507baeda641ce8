from .sem_seg_evaluation import SemSegEvaluator, metrics_from_confusion

__all__ = ["SemSegEvaluator", "metrics_from_confusion"]
