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
    label_probability,
    ohem_cross_entropy,
    paste_with_probability,
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
    given = ohem_cross_entropy(logits, labels, 0.7, min_kept, label_prob=label_probability(logits, labels, 5))
    assert torch.allclose(given, ours)


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
    own = torch.tensor([[[p[0, 1, 0, 0], p[0, 1, 0, 1]], [p[0, 0, 1, 0], 1.0]]])  # 1 where unlabelled
    assert torch.allclose(label_probability(logits, labels, 3), own)
    expected = torch.tensor([p[0, 0, 1, 0], p[0, 1, 0, 0], 0.0])
    assert torch.allclose(class_confidence(label_probability(logits, labels, 3), labels, 3), expected)
    # A real batch against the released per-class loop (cal_category_confidence).
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(3, 19, 12, 20, generator=g), torch.randint(0, 21, (3, 12, 20), generator=g)
    labels[labels > 18] = 255
    labels[labels == 4] = 5  # an absent class
    p = torch.softmax(logits, 1)
    loop = torch.stack([(p[:, c] * (labels == c)).sum() / (labels == c).sum().clamp(min=1) for c in range(19)])
    ours = class_confidence(label_probability(logits, labels, 19), labels, 19)
    assert torch.allclose(ours, loop) and loop[4] == 0
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


def test_half_the_labelled_samples_get_a_paste_as_released():
    # cityscapes_semi_cp.py:179-192 with acp.prob 0.5: a paste sample with probability 1/2, else all zeros.
    torch.manual_seed(0)
    paste_labels = torch.full((4000, 2, 2), 5)
    kept = paste_with_probability(paste_labels, 0.5)
    pasted = (kept != 0).flatten(1).all(1).float()
    assert ((kept == 0) | (kept == 5)).all() and ((kept == 0).flatten(1).all(1) | pasted.bool()).all()
    # 4000 Bernoulli(1/2) draws: a standard deviation of 0.008 for the fraction; 0.04 is five of them.
    assert abs(pasted.mean().item() - 0.5) < 0.04
    assert paste_with_probability(paste_labels, 1.0) is paste_labels
    images, labels = torch.zeros(4000, 3, 2, 2), torch.full((4000, 2, 2), 7)
    _, out = copy_paste(images, labels, torch.ones_like(images), kept, [5])
    assert torch.equal((out == 5).flatten(1).all(1).float(), pasted)  # the zeroed ones stay as they were


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


def _reference_contrastive(
    rep,
    label_l,
    label_u,
    prob_l,
    prob_u,
    low_mask,
    high_mask,
    memobank,
    queue_size,
    rep_teacher,
    negatives_of_other_classes,
):
    # compute_contra_memobank_loss (no momentum prototype, conf_weight False) with dequeue_and_enqueue, transcribed for
    # one process. negatives_of_other_classes=True is U2PL's paper (and this project); False is the released line.
    # One change from the release: each present class's anchors and prototype are its own (c = valid_classes[i]),
    # the pairing the paper means and the library's default; loss_helper.py:173-200 indexes them by i (U2PL issue
    # #111), as tests/test_stal_contrastive_as_released.py transcribes it.
    cfg = dict(
        current_class_threshold=0.3,
        current_class_negative_threshold=1.0,
        low_rank=3,
        high_rank=20,
        temperature=0.5,
        num_queries=16,
        num_negatives=5,
    )
    num_feat, num_segments = rep.shape[1], label_l.shape[1]
    onehot = torch.cat((label_l, label_u), dim=0)
    low_valid_pixel = onehot * low_mask
    high_valid_pixel = (1 - onehot if negatives_of_other_classes else onehot) * high_mask
    rep = rep.permute(0, 2, 3, 1)
    rep_teacher = rep_teacher.permute(0, 2, 3, 1)
    seg_feat_low_entropy_list, seg_num_list, seg_proto_list, valid_classes = [], [], [], []
    _, prob_indices_l = torch.sort(prob_l, 1, True)
    prob_indices_l = prob_indices_l.permute(0, 2, 3, 1)
    _, prob_indices_u = torch.sort(prob_u, 1, True)
    prob_indices_u = prob_indices_u.permute(0, 2, 3, 1)
    prob = torch.cat((prob_l, prob_u), dim=0)
    for i in range(num_segments):
        low_valid_pixel_seg = low_valid_pixel[:, i]
        high_valid_pixel_seg = high_valid_pixel[:, i]
        prob_seg = prob[:, i, :, :]
        rep_mask_low_entropy = (prob_seg > cfg["current_class_threshold"]) * low_valid_pixel_seg.bool()
        rep_mask_high_entropy = (prob_seg < cfg["current_class_negative_threshold"]) * high_valid_pixel_seg.bool()
        seg_feat_low_entropy_list.append(rep[rep_mask_low_entropy])
        seg_proto_list.append(torch.mean(rep_teacher[low_valid_pixel_seg.bool()].detach(), dim=0, keepdim=True))
        class_mask_u = torch.sum(prob_indices_u[:, :, :, cfg["low_rank"] : cfg["high_rank"]].eq(i), dim=3).bool()
        class_mask_l = torch.sum(prob_indices_l[:, :, :, : cfg["low_rank"]].eq(i), dim=3).bool()
        class_mask = torch.cat((class_mask_l * (label_l[:, i] == 0), class_mask_u), dim=0)
        keys = rep_teacher[rep_mask_high_entropy * class_mask].detach()
        memobank[i][0] = torch.cat((memobank[i][0], keys), dim=0)[-queue_size:]
        if low_valid_pixel_seg.sum() > 0:
            seg_num_list.append(int(low_valid_pixel_seg.sum().item()))
            valid_classes.append(i)
    if len(seg_num_list) <= 1:
        return torch.tensor(0.0) * rep.sum()
    reco_loss = torch.tensor(0.0)
    seg_proto = torch.cat(seg_proto_list)
    for i in range(len(seg_num_list)):
        c = valid_classes[i]
        if len(seg_feat_low_entropy_list[c]) > 0 and memobank[c][0].shape[0] > 0:
            anchor_feat = seg_feat_low_entropy_list[c][
                torch.randint(len(seg_feat_low_entropy_list[c]), size=(cfg["num_queries"],))
            ]
        else:
            continue
        negative_feat = memobank[c][0]
        negative_feat = negative_feat[
            torch.randint(len(negative_feat), size=(cfg["num_queries"] * cfg["num_negatives"],))
        ]
        negative_feat = negative_feat.reshape(cfg["num_queries"], cfg["num_negatives"], num_feat)
        positive_feat = seg_proto[c].unsqueeze(0).unsqueeze(0).repeat(cfg["num_queries"], 1, 1)
        all_feat = torch.cat((positive_feat, negative_feat), dim=1)
        seg_logits = torch.cosine_similarity(anchor_feat.unsqueeze(1), all_feat, dim=2)
        reco_loss = reco_loss + F.cross_entropy(seg_logits / cfg["temperature"], torch.zeros(cfg["num_queries"]).long())
    return reco_loss / len(seg_num_list)


def _contrastive_inputs(num_unlabelled, seed=0):
    torch.manual_seed(seed)
    B, C, D, h, w = 2 + num_unlabelled, 5, 8, 6, 7
    probs = torch.softmax(torch.randn(B, C, h, w) * 2, 1)
    labels = probs.argmax(1)
    labels[:2] = torch.randint(0, C, (2, h, w))  # ground truth of the labelled images
    labels[0, 0, :3] = 255
    entropy = -(probs * probs.log()).sum(1)
    low = (entropy <= entropy.flatten().quantile(0.5)) & (labels != 255)
    high = (entropy >= entropy.flatten().quantile(0.3)) & (labels != 255)
    low[:2] = labels[:2] != 255  # labelled pixels are anchors and negatives candidates, as train.py does
    high[:2] = labels[:2] != 255
    rep, rep_teacher = torch.randn(B, D, h, w), torch.randn(B, D, h, w)
    onehot = F.one_hot(torch.where(labels == 255, 0, labels), C).permute(0, 3, 1, 2).float()
    onehot = onehot * (labels != 255)[:, None]
    return rep, rep_teacher, labels, probs, low, high, onehot


def test_pixel_contrastive_loss_is_u2pls_paper_and_the_released_mask_is_empty_at_equal_pixels():
    from uda_plugins.methods.semi_supervised import ContrastQueues, pixel_contrastive_loss

    rep, rep_teacher, labels, probs, low, high, onehot = _contrastive_inputs(num_unlabelled=1)
    queues = ContrastQueues([40] * 5, dim=8, dtype=torch.float32)
    torch.manual_seed(7)
    ours = pixel_contrastive_loss(
        rep, rep_teacher, labels, probs, low, high, 2, queues, num_queries=16, num_negatives=5
    )

    def reference(negatives_of_other_classes):
        memobank = [[torch.zeros(0, 8)] for _ in range(5)]
        torch.manual_seed(7)
        inputs = (rep, onehot[:2], onehot[2:], probs[:2], probs[2:], low[:, None].float(), high[:, None].float())
        loss = _reference_contrastive(*inputs, memobank, 40, rep_teacher, negatives_of_other_classes)
        return loss, memobank

    expected, memobank = reference(negatives_of_other_classes=True)
    assert ours > 0 and torch.allclose(ours, expected)
    for c in range(5):
        assert torch.equal(queues.get(c), memobank[c][0])
    # The released mask (negatives must be of the class) leaves every queue empty when the labels and probabilities
    # are read at the same pixels, as here. The release reads them at different pixels, where it does not (A2;
    # UDA.STAL.CONTRASTIVE_AS_RELEASED, tests/test_stal_contrastive_as_released.py).
    loss, released = reference(negatives_of_other_classes=False)
    assert loss == 0 and all(len(q[0]) == 0 for q in released)


def test_contrast_queues_keep_the_newest_keys_and_are_checkpointed():
    from uda_plugins.methods.semi_supervised import ContrastQueues

    queues = ContrastQueues([3, 5], dim=2)
    queues.push(0, torch.arange(8.0).view(4, 2))
    assert queues.get(0).tolist() == [[2, 3], [4, 5], [6, 7]] and len(queues.get(1)) == 0
    assert set(queues.state_dict()) == {"length", "start", "keys_0", "keys_1"}
    assert [tuple(queues.state_dict()[f"keys_{c}"].shape) for c in (0, 1)] == [(3, 2), (5, 2)]
    assert queues.keys_1.dtype == torch.float16
    queues.push(1, torch.ones(2, 2))
    restored = ContrastQueues([3, 5], dim=2)
    restored.load_state_dict(queues.state_dict())
    assert restored.get(0).tolist() == queues.get(0).tolist() and restored.get(1).tolist() == [[1, 1], [1, 1]]
    # A checkpoint from before the ring buffers (no "start") holds its queues oldest first.
    old = {k: v for k, v in queues.state_dict().items() if k != "start"}
    restored = ContrastQueues([3, 5], dim=2)
    restored.load_state_dict(old)
    assert restored.get(0).tolist() == [[2, 3], [4, 5], [6, 7]]


def test_contrast_queues_are_fifo_queues_through_wraps_and_resumes():
    from uda_plugins.methods.semi_supervised import ContrastQueues, _unit_keys

    g = torch.Generator().manual_seed(0)
    queues, fifo, n = ContrastQueues([7, 4], dim=1, dtype=torch.float32), [[], []], 0
    for step in range(40):
        counts = torch.randint(0, 10, (2,), generator=g).tolist()
        keys = torch.arange(n, n + sum(counts), dtype=torch.float32)[:, None]
        n += sum(counts)
        queues.push_many(counts, keys)
        fifo[0] = (fifo[0] + keys[: counts[0], 0].tolist())[-7:]
        fifo[1] = (fifo[1] + keys[counts[0] :, 0].tolist())[-4:]
        assert [queues.get(c)[:, 0].tolist() for c in (0, 1)] == fifo, step
        keys_0, start = queues.storage(0)  # queue position i is storage row (start + i) % length
        assert keys_0[(torch.arange(len(keys_0)) + start) % len(keys_0), 0].tolist() == fifo[0]
        if fifo[0]:  # the contrastive term's draws address queue positions
            positions = torch.randint(len(fifo[0]), (5,), generator=g)
            drawn = _unit_keys(queues, 0, positions, torch.float32)
            assert torch.equal(drawn, F.normalize(queues.get(0), dim=-1, eps=1e-8)[positions])
        if step % 7 == 3:  # resume from a checkpoint in the middle of a wrap
            resumed = ContrastQueues([7, 4], dim=1, dtype=torch.float32)
            resumed.load_state_dict(queues.state_dict())
            queues = resumed
