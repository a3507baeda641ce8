"""STAL / ILM-ASSL's semi-supervised pieces against transcriptions of the released code (licongguan/ILM-ASSL
core/utils/loss_helper.py, core/utils/utils.py, train.py) on hand-made and random tensors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uda_plugins.methods.semi_supervised import (
    class_confidence,
    confidence_weighted_consistency,
    copy_paste,
    cutmix_box,
    draw_cutmix_source,
    draw_query_classes,
    filter_unlabelled_pseudo_labels,
    ohem_cross_entropy,
    random_half_box,
    update_cutmix_bank,
)


def _reference_ohem(pred, target, ignore_index=255, thresh=0.7, min_kept=100000):
    # OhemCrossEntropy2dTensor.forward, transcribed
    b, c, h, w = pred.size()
    target = target.view(-1)
    valid_mask = target.ne(ignore_index)
    target = target * valid_mask.long()
    num_valid = valid_mask.sum()
    prob = F.softmax(pred, dim=1)
    prob = (prob.transpose(0, 1)).reshape(c, -1)
    if min_kept > num_valid:
        pass
    elif num_valid > 0:
        prob = prob.masked_fill_(~valid_mask, 1)
        mask_prob = prob[target, torch.arange(len(target), dtype=torch.long)]
        threshold = thresh
        if min_kept > 0:
            _, index = mask_prob.sort()
            threshold_index = index[min(len(index), min_kept) - 1]
            if mask_prob[threshold_index] > thresh:
                threshold = mask_prob[threshold_index]
            kept_mask = mask_prob.le(threshold)
            target = target * kept_mask.long()
            valid_mask = valid_mask * kept_mask
    target = target.masked_fill_(~valid_mask, ignore_index)
    target = target.view(b, h, w)
    return torch.nn.CrossEntropyLoss(reduction="mean", ignore_index=ignore_index)(pred, target)


@pytest.mark.parametrize("min_kept", [0, 50, 300, 10000])
def test_ohem_equals_the_reference(min_kept):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 12, 14) * 2
    labels = torch.randint(0, 5, (2, 12, 14))
    labels[:, :3] = 255
    ours = ohem_cross_entropy(logits, labels, 0.7, min_kept)
    assert torch.allclose(ours, _reference_ohem(logits.clone(), labels.clone(), 255, 0.7, min_kept))


def _reference_consistency(preds, conf, gt, gamma=2, dcp_criterion=None, gamma2=1.0, rand_maps=None):
    # Criterion_cons.forward with sample=True; the reference's torch.rand(h, w) per class passed in.
    ce_loss = torch.nn.CrossEntropyLoss(ignore_index=255, reduction="none")(preds, gt)
    conf = torch.pow(conf, gamma)
    if dcp_criterion is not None:
        dcp_criterion = 1 - dcp_criterion
        dcp_criterion = dcp_criterion / (torch.max(dcp_criterion) + 1e-12)
        dcp_criterion = torch.pow(dcp_criterion, gamma2)
        pred_map = preds.max(1)[1].float()
        sample_map = torch.zeros_like(pred_map).float()
        for idx in range(len(dcp_criterion)):
            prob = 1 - dcp_criterion[idx]
            rand_map = rand_maps[idx] * (pred_map == idx)
            rand_map = (rand_map > prob) * 1.0
            sample_map += rand_map
        conf = conf * sample_map
    conf = conf / (conf.sum() + 1e-12)
    return (conf * ce_loss).sum()


def test_consistency_weights_by_squared_confidence_and_samples_hard_classes():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 8)
    teacher = torch.softmax(torch.randn(2, 4, 6, 8) * 3, 1)
    confidence, labels = teacher.max(1)
    labels[0, 0, 0] = 255
    assert torch.allclose(
        confidence_weighted_consistency(logits, confidence, labels), _reference_consistency(logits, confidence, labels)
    )
    # Sampling: a pixel the student predicts as class c is kept with probability (1 - cc_c) / max(1 - cc): here
    # 1, 0.125, 0.625, 1. With confidence 1 the kept pixels are those whose logits get a gradient.
    criterion = torch.tensor([0.2, 0.9, 0.5, 0.2])
    big = torch.randn(4000, 4, 1, 1).expand(-1, -1, 2, 2).contiguous().requires_grad_(True)
    predicted = big.detach().argmax(1)
    torch.manual_seed(1)
    confidence_weighted_consistency(big, torch.ones(predicted.shape), predicted, criterion).backward()
    touched = big.grad.abs().sum(1) > 0
    for c, expected in enumerate([1.0, 0.125, 0.625, 1.0]):
        assert touched[predicted == c].float().mean().item() == pytest.approx(expected, abs=0.04), c
    # The reference's rule given the same random numbers (one per pixel here).
    torch.manual_seed(5)
    ours = confidence_weighted_consistency(logits, confidence, labels, criterion)
    torch.manual_seed(5)
    rand = torch.rand(2, 6, 8)
    reference_maps = [torch.where(logits.argmax(1) == c, rand, torch.zeros_like(rand)) for c in range(4)]
    assert torch.allclose(
        ours, _reference_consistency(logits, confidence, labels, dcp_criterion=criterion, rand_maps=reference_maps)
    )


def test_class_confidence_and_query_classes():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1] = 2.0
    labels = torch.tensor([[[1, 1], [0, 255]]])
    p = torch.softmax(logits, 1)
    assert torch.allclose(class_confidence(logits, labels, 3), torch.tensor([p[0, 0, 1, 0], p[0, 1, 0, 0], 0.0]))
    torch.manual_seed(0)
    criterion = torch.tensor([0.99, 0.99, 0.0, 0.99])
    draws = [c for _ in range(2000) for c in draw_query_classes(criterion, [1, 2, 3], draws=1)]
    share = np.mean(np.array(draws) == 2)
    expected = np.exp(1.0) / (np.exp(1.0) + 2 * np.exp(0.1))  # P ~ exp(sqrt(1 - cc))
    assert share == pytest.approx(expected, abs=0.03)
    assert len(draw_query_classes(torch.zeros(19), [5], draws=3)) == 1  # duplicates removed


def test_copy_paste_pastes_the_query_classes_with_their_pixels():
    images = torch.zeros(2, 3, 4, 4)
    paste_images = torch.ones(2, 3, 4, 4)
    labels = torch.full((2, 4, 4), 7)
    paste_labels = torch.tensor([[[0, 5, 5, 3]] * 4, [[0, 0, 0, 0]] * 4])
    out_images, out_labels = copy_paste(images, labels, paste_images, paste_labels, [5, 3])
    assert out_labels[0, 0].tolist() == [7, 5, 5, 3] and out_images[0, :, 0].tolist() == [[0, 1, 1, 1]] * 3
    assert torch.equal(out_labels[1], labels[1]) and torch.equal(out_images[1], images[1])  # an all-zero paste label


def test_cutmix_box_bank_and_draws():
    prediction = np.zeros((20, 30), np.int64)
    prediction[2:6, 3:9] = 4  # 24 pixels
    prediction[10:12, 20:21] = 4  # 2 pixels: below 0.5% of 600 = 3
    torch.manual_seed(0)
    assert cutmix_box(prediction, 4, area_thresh=0.005) == (2, 3, 6, 9)
    y0, x0, y1, x1 = cutmix_box(prediction, 7)  # absent: a random box of half the area
    assert abs((y1 - y0) * (x1 - x0) - 300) <= 30 and 0 <= y0 < y1 <= 20 and 0 <= x0 < x1 <= 30
    for _ in range(50):
        y0, x0, y1, x1 = random_half_box(20, 30)
        assert 0 <= y0 and y1 <= 20 and 0 <= x0 and x1 <= 30
    bank = torch.zeros(5, 3, dtype=torch.uint8)
    bank[0, 2] = 1
    predictions = torch.zeros(2, 10, 10, dtype=torch.long)
    predictions[0, :1, :1] = 3  # 1% exactly: kept (>=)
    predictions[1, :5] = 4
    update_cutmix_bank(bank, predictions, [0, 2], area_thresh=0.01)
    assert bank[:, 0].tolist() == [1, 0, 0, 1, 0] and bank[:, 2].tolist() == [1, 0, 0, 0, 1]
    torch.manual_seed(0)
    picks = [draw_cutmix_source(bank, torch.tensor([0.9, 0.9, 0.9, 0.9, 0.9])) for _ in range(300)]
    for image, c in picks:
        assert bank[c, image] == 1 or bank[c].sum() == 0


def test_unlabelled_filter_drops_the_uncertain_tail_or_as_released_the_confident_one():
    entropy = torch.arange(100, dtype=torch.float32).view(1, 10, 10)
    labels = torch.zeros(1, 10, 10, dtype=torch.long)
    u2pl = filter_unlabelled_pseudo_labels(labels, entropy, 20)
    assert (u2pl == 255).sum() == 20 and (u2pl.flatten()[80:] == 255).all()
    released = filter_unlabelled_pseudo_labels(labels, entropy, 20, as_released=True)
    assert (released == 255).sum() == 20 and (released.flatten()[:20] == 255).all()
