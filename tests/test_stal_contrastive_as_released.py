"""STAL's contrastive term as released (UDA.STAL.CONTRASTIVE_AS_RELEASED; docs/release-audit/stal-ilm-assl.md A2, B7,
B8) against a transcription of licongguan/ILM-ASSL @ d10fd0f at the release's shapes: 769x769 crops, a 193x193
representation, 4 labelled images and 1 (CutMixed) unlabelled image per GPU, 19 classes, U2PL's sampling constants.

The transcription covers the release from the teacher's full-resolution logits on: the adaptive CutMix of the
unlabelled logits at 769 (train.py:528-539), its entropy filter (train.py:546-561), the probabilities resized with
align_corners=True (train.py:574-582), the masks and labels resized by nearest neighbour through ``label_onehot``
(train.py:684-731, core/utils/utils.py:48-57) and ``compute_contra_memobank_loss`` with ``dequeue_and_enqueue`` on one
process (core/utils/loss_helper.py:32-233, core/utils/utils.py:26-45). The teacher logits are synthetic but shaped as
the release's network gives them: class regions at the ASPP's stride 8 (97x97), resized with align_corners=True to the
decoder's 193x193 and to the 769x769 crop (train.py:497-510). The representation is 32 channels wide, not 256: the
width decides no sample, and 256 channels would make the test 8 times slower on 2 cores.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uda_plugins.methods.semi_supervised import (
    ContrastQueues,
    contrastive_inputs,
    cutmix_box,
    draw_contrastive_samples,
    draw_contrastive_samples_as_released,
    filter_unlabelled_pseudo_labels,
    info_nce_loss,
    release_label_onehot,
)

C, CROP, SMALL, ASPP, D = 19, 769, 193, 97, 32
NUM_LABELLED = 4  # config.yaml batch_size 4 per GPU; one unlabelled image per GPU (train.py:436-452)
CAPACITIES = [50000] + [30000] * (C - 1)  # train.py:143-150
CFG = dict(  # experiments/gtav2cityscapes/*/config.yaml trainer.contrastive
    low_rank=3,
    high_rank=20,
    current_class_threshold=0.3,
    current_class_negative_threshold=1.0,
    unsupervised_entropy_ignore=80,
    low_entropy_threshold=20,
    num_negatives=50,
    num_queries=256,
    temperature=0.5,
)
SAMPLING = dict(
    class_threshold=0.3, negative_threshold=1.0, low_rank=3, high_rank=20, num_queries=256, num_negatives=50
)
DROP_PERCENT = 18.0  # train.py:327-329 at the contrastive start: 20 x (1 - 20 / 200)


# ------------------------------------------------------------------------------------- the release, transcribed
def _label_onehot(inputs, num_segments):
    # core/utils/utils.py:48-57 (on the CPU)
    batch_size, im_h, im_w = inputs.shape
    outputs = torch.zeros((num_segments, batch_size, im_h, im_w))
    inputs_temp = inputs.clone()
    inputs_temp[inputs == 255] = 0
    outputs.scatter_(0, inputs_temp.unsqueeze(1), 1.0)
    outputs[:, inputs == 255] = 0
    return outputs.permute(1, 0, 2, 3)


def _dequeue_and_enqueue(keys, queue, queue_size):
    # core/utils/utils.py:26-45 on one process (gather_together returns the process's own keys)
    queue[0] = torch.cat((queue[0], keys.detach().clone()), dim=0)
    if queue[0].shape[0] >= queue_size:
        queue[0] = queue[0][-queue_size:, :]
    return keys.shape[0]


def _release_pseudo_labels(preds_teacher_unsup):
    # train.py:546-561 (acm: no valid_mask term): the teacher's labels, the lowest-entropy pixels ignored (A5)
    probs_teacher_unsup = F.softmax(preds_teacher_unsup, dim=1)
    entropy_teacher_unsup = -torch.sum(probs_teacher_unsup * torch.log(probs_teacher_unsup + 1e-10), dim=1)
    thresh = np.percentile(entropy_teacher_unsup.numpy().flatten(), DROP_PERCENT)
    logits_teacher_unsup = preds_teacher_unsup.max(1)[1]
    logits_teacher_unsup[entropy_teacher_unsup < thresh] = 255
    return logits_teacher_unsup, entropy_teacher_unsup


def _release_inputs(labels_sup, preds_teacher_sup, preds_teacher_unsup, logits_teacher_unsup, entropy):
    h_small = w_small = SMALL
    # train.py:574-582
    prob_l_teacher = F.softmax(
        F.interpolate(preds_teacher_sup, (h_small, w_small), mode="bilinear", align_corners=True), dim=1
    )
    prob_u_teacher = F.softmax(
        F.interpolate(preds_teacher_unsup, (h_small, w_small), mode="bilinear", align_corners=True), dim=1
    )
    # train.py:684-731 (negative_high_entropy True)
    low_thresh = np.percentile(entropy.numpy().flatten(), CFG["low_entropy_threshold"])
    low_entropy_mask = entropy.le(low_thresh).float() * (logits_teacher_unsup != 255).bool()
    high_thresh = np.percentile(entropy.numpy().flatten(), CFG["unsupervised_entropy_ignore"])
    high_entropy_mask = entropy.ge(high_thresh).float() * (logits_teacher_unsup != 255).bool()
    low_mask_all = torch.cat(((labels_sup.unsqueeze(1) != 255).float(), low_entropy_mask.unsqueeze(1)))
    low_mask_all = F.interpolate(low_mask_all, size=(h_small, w_small), mode="nearest")
    high_mask_all = torch.cat(((labels_sup.unsqueeze(1) != 255).float(), high_entropy_mask.unsqueeze(1)))
    high_mask_all = F.interpolate(high_mask_all, size=(h_small, w_small), mode="nearest")
    label_l_small = F.interpolate(_label_onehot(labels_sup, C), size=(h_small, w_small), mode="nearest")
    label_u_small = F.interpolate(_label_onehot(logits_teacher_unsup, C), size=(h_small, w_small), mode="nearest")
    return label_l_small.long(), label_u_small.long(), prob_l_teacher, prob_u_teacher, low_mask_all, high_mask_all


def _compute_contra_memobank_loss(rep, label_l, label_u, prob_l, prob_u, low_mask, high_mask, memobank, rep_teacher):
    # core/utils/loss_helper.py:32-233 (momentum_prototype None, conf_weight False); also returns what it sampled
    low_rank, high_rank = CFG["low_rank"], CFG["high_rank"]
    num_queries, num_negatives = CFG["num_queries"], CFG["num_negatives"]
    num_feat = rep.shape[1]
    num_segments = label_l.shape[1]
    low_valid_pixel = torch.cat((label_l, label_u), dim=0) * low_mask
    high_valid_pixel = torch.cat((label_l, label_u), dim=0) * high_mask
    rep = rep.permute(0, 2, 3, 1)
    rep_teacher = rep_teacher.permute(0, 2, 3, 1)
    seg_feat_low_entropy_list, seg_num_list, seg_proto_list = [], [], []
    _, prob_indices_l = torch.sort(prob_l, 1, True)
    prob_indices_l = prob_indices_l.permute(0, 2, 3, 1)
    _, prob_indices_u = torch.sort(prob_u, 1, True)
    prob_indices_u = prob_indices_u.permute(0, 2, 3, 1)
    prob = torch.cat((prob_l, prob_u), dim=0)
    valid_classes, new_keys = [], []
    for i in range(num_segments):
        low_valid_pixel_seg = low_valid_pixel[:, i]
        high_valid_pixel_seg = high_valid_pixel[:, i]
        prob_seg = prob[:, i, :, :]
        rep_mask_low_entropy = (prob_seg > CFG["current_class_threshold"]) * low_valid_pixel_seg.bool()
        rep_mask_high_entropy = (prob_seg < CFG["current_class_negative_threshold"]) * high_valid_pixel_seg.bool()
        seg_feat_low_entropy_list.append(rep[rep_mask_low_entropy])
        seg_proto_list.append(torch.mean(rep_teacher[low_valid_pixel_seg.bool()].detach(), dim=0, keepdim=True))
        class_mask_u = torch.sum(prob_indices_u[:, :, :, low_rank:high_rank].eq(i), dim=3).bool()
        class_mask_l = torch.sum(prob_indices_l[:, :, :, :low_rank].eq(i), dim=3).bool()
        class_mask = torch.cat((class_mask_l * (label_l[:, i] == 0), class_mask_u), dim=0)
        negative_mask = rep_mask_high_entropy * class_mask
        keys = rep_teacher[negative_mask].detach()
        new_keys.append(_dequeue_and_enqueue(keys, memobank[i], CAPACITIES[i]))
        if low_valid_pixel_seg.sum() > 0:
            seg_num_list.append(int(low_valid_pixel_seg.sum().item()))
            valid_classes.append(i)
    sampled = dict(pushed=new_keys, valid_classes=valid_classes, pairs=[], anchors=[], prototypes=[], negatives=[])
    if len(seg_num_list) <= 1:
        return torch.tensor(0.0) * rep.sum(), sampled
    reco_loss = torch.tensor(0.0)
    seg_proto = torch.cat(seg_proto_list)
    valid_seg = len(seg_num_list)
    for i in range(valid_seg):  # anchors and prototype of class i, negatives of class valid_classes[i] (as released)
        if len(seg_feat_low_entropy_list[i]) > 0 and memobank[valid_classes[i]][0].shape[0] > 0:
            seg_low_entropy_idx = torch.randint(len(seg_feat_low_entropy_list[i]), size=(num_queries,))
            anchor_feat = seg_feat_low_entropy_list[i][seg_low_entropy_idx].clone()
        else:
            reco_loss = reco_loss + 0 * rep.sum()
            continue
        with torch.no_grad():
            negative_feat = memobank[valid_classes[i]][0].clone()
            high_entropy_idx = torch.randint(len(negative_feat), size=(num_queries * num_negatives,))
            negative_feat = negative_feat[high_entropy_idx]
            negative_feat = negative_feat.reshape(num_queries, num_negatives, num_feat)
            positive_feat = seg_proto[i].unsqueeze(0).unsqueeze(0).repeat(num_queries, 1, 1)
            all_feat = torch.cat((positive_feat, negative_feat), dim=1)
        seg_logits = torch.cosine_similarity(anchor_feat.unsqueeze(1), all_feat, dim=2)
        reco_loss = reco_loss + F.cross_entropy(seg_logits / CFG["temperature"], torch.zeros(num_queries).long())
        sampled["pairs"].append((i, valid_classes[i]))
        sampled["anchors"].append(anchor_feat)
        sampled["prototypes"].append(seg_proto[i])
        sampled["negatives"].append(negative_feat)
    return reco_loss / valid_seg, sampled


# --------------------------------------------------------------------------------------------- a synthetic step
# Classes a batch shows: not rider, truck, train (a Cityscapes batch often lacks some), so the release's pairing of
# class i's anchors with the i-th present class's queue pairs different classes from class 13 (car) on.
SHOWN = torch.tensor([c for c in range(C) if c not in (12, 14, 16)])
PREFILLED = 100  # keys in every queue from earlier steps, the same in both


def _regions(g, n):
    """A function of the grid size giving (n, size, size) class maps of the same Voronoi regions (30 sites of classes
    drawn from SHOWN) on the [0, 768] square."""
    sites, classes = (
        torch.rand(n, 30, 2, generator=g) * (CROP - 1),
        SHOWN[torch.randint(len(SHOWN), (n, 30), generator=g)],
    )

    def at(size: int) -> torch.Tensor:
        coords = torch.linspace(0, CROP - 1, size)
        yx = torch.stack(torch.meshgrid(coords, coords, indexing="ij"), -1).view(-1, 2)
        nearest = torch.stack([torch.cdist(yx, s).argmin(-1) for s in sites])
        return classes.gather(1, nearest).view(n, size, size)

    return at


def _teacher_logits(g, n):
    """The teacher's (n, C, 769, 769) logits as the release's network and train.py:497-510 give them (a margin of 6 for
    the region's class, noise of standard deviation 1), and the function giving the class maps they come from."""
    regions = _regions(g, n)
    logits = 6.0 * F.one_hot(regions(ASPP), C).permute(0, 3, 1, 2).float() + torch.randn(n, C, ASPP, ASPP, generator=g)
    logits = F.interpolate(logits, (SMALL, SMALL), mode="bilinear", align_corners=True)  # the decoder's upsampling
    return F.interpolate(logits, (CROP, CROP), mode="bilinear", align_corners=True), regions


def _step(seed, acm):
    """One step's full-resolution inputs of the contrastive term: the labelled batch's labels (ground truth with an
    ignored band) and teacher logits, the unlabelled image's teacher logits (CutMixed with a partner at 769 as
    train.py:528-539 does), the student's and teacher's representations, and the queues' earlier keys."""
    g = torch.Generator().manual_seed(seed)
    preds_teacher_sup, regions = _teacher_logits(g, NUM_LABELLED)
    labels_sup = regions(CROP)  # ground truth at full resolution: the regions' exact boundaries
    labels_sup[:, :40] = 255  # e.g. the ego vehicle's hood
    unsup, _ = _teacher_logits(g, 2)  # the unlabelled image and its partner from the CutMix bank
    if acm:
        partner_prediction = unsup[1].argmax(0).numpy()
        category = int(np.bincount(partner_prediction.ravel(), minlength=C)[1:].argmax()) + 1
        y0, x0, y1, x1 = cutmix_box(partner_prediction, category, 0.005)
        valid_mask_mix = torch.zeros(CROP, CROP)
        valid_mask_mix[y0:y1, x0:x1] = 1
        preds_teacher_unsup = (unsup[0] * (1 - valid_mask_mix) + unsup[1] * valid_mask_mix).unsqueeze(0)
    else:
        preds_teacher_unsup = unsup[:1]
    rep_student = torch.randn(NUM_LABELLED + 1, D, SMALL, SMALL, generator=g)
    rep_teacher = torch.randn(NUM_LABELLED + 1, D, SMALL, SMALL, generator=g)
    earlier_keys = torch.randn(C, PREFILLED, D, generator=g)
    return dict(
        labels_sup=labels_sup,
        preds_teacher_sup=preds_teacher_sup,
        preds_teacher_unsup=preds_teacher_unsup,
        rep_student=rep_student,
        rep_teacher=rep_teacher,
        earlier_keys=earlier_keys,
    )


def _release(step):
    """The release's step (the transcription): its contrastive inputs, loss, samples and queues."""
    logits_teacher_unsup, entropy = _release_pseudo_labels(step["preds_teacher_unsup"].clone())
    inputs = _release_inputs(
        step["labels_sup"], step["preds_teacher_sup"], step["preds_teacher_unsup"], logits_teacher_unsup, entropy
    )
    memobank = [[keys.clone()] for keys in step["earlier_keys"]]
    torch.manual_seed(3)
    loss, sampled = _compute_contra_memobank_loss(step["rep_student"], *inputs, memobank, step["rep_teacher"])
    return dict(pseudo_labels=logits_teacher_unsup, inputs=inputs, loss=loss, sampled=sampled, memobank=memobank)


def _ours(step, as_released, prefill=True):
    """What STAL's step gives the contrastive draw (stal.py forward_train, _contrastive_draw), the draw, the loss."""
    probs_u = torch.softmax(step["preds_teacher_unsup"], 1)
    pseudo_u = probs_u.argmax(1)
    entropy = probs_u.add(1e-10).log_().mul_(probs_u).sum(1).neg_()
    pseudo_u = filter_unlabelled_pseudo_labels(pseudo_u, entropy, DROP_PERCENT, as_released=True)
    logits = [step["preds_teacher_sup"], step["preds_teacher_unsup"]]
    inputs = contrastive_inputs(step["labels_sup"], pseudo_u, logits, entropy, (SMALL, SMALL), 20.0, 80.0, as_released)
    queues = ContrastQueues(CAPACITIES, dim=D, dtype=torch.float32)
    if prefill:
        queues.push_many([PREFILLED] * C, step["earlier_keys"].reshape(-1, D))
    sample = draw_contrastive_samples_as_released if as_released else draw_contrastive_samples
    torch.manual_seed(3)
    draw = sample(step["rep_teacher"], *inputs, NUM_LABELLED, queues, **SAMPLING)
    loss = info_nce_loss(step["rep_student"], draw, CFG["temperature"])
    return dict(pseudo_labels=pseudo_u, inputs=inputs, draw=draw, queues=queues, loss=loss)


@pytest.fixture(scope="module", params=[False, True], ids=["no_mixing", "acm"])
def step(request):
    return _step(seed=11 if request.param else 5, acm=request.param)


@pytest.fixture(scope="module")
def release(step):
    return _release(step)


@pytest.fixture(scope="module")
def ours(step):
    return _ours(step, as_released=True)


# ------------------------------------------------------------------------------------------------------ tests
def test_release_label_onehot_puts_every_images_classes_in_slot_0():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(C, (NUM_LABELLED, 9, 11), generator=g)
    labels[1, :2] = 255  # image 1's ignored pixels count as class 0 in slot 0
    labels[0, -1] = 255  # image 0's clear slot 0
    expected = _label_onehot(labels, C)
    onehot = release_label_onehot(labels, C)
    assert torch.equal(onehot, expected.bool())
    assert onehot.sum((1, 2, 3)).tolist()[1:] == [0, 0, 0] and onehot[0].sum(0).max() > 1  # a union in slot 0 only
    single = labels[:1]
    assert torch.equal(release_label_onehot(single, C), _label_onehot(single, C).bool())  # one image: the one-hot
    assert int(release_label_onehot(single, C).sum()) == int((single != 255).sum())


def test_nearest_labels_and_aligned_probabilities_come_from_different_pixels():
    # The crux of A2: from 769 to 193, nearest reads row floor(i * 769 / 193) and bilinear with align_corners=True
    # reads row 4 i exactly ((769 - 1) / (193 - 1) = 4), up to 3 rows apart (align_corners=False, ours, blends the
    # rows around 3.98 i + 1.49, which the nearest row floor(3.98 i) is never more than 2.5 from).
    rows = torch.arange(CROP, dtype=torch.float32).view(1, 1, CROP, 1).expand(1, 1, CROP, CROP)
    nearest = F.interpolate(rows, (SMALL, SMALL), mode="nearest")[0, 0, :, 0]
    aligned = F.interpolate(rows, (SMALL, SMALL), mode="bilinear", align_corners=True)[0, 0, :, 0]
    i = torch.arange(SMALL)
    assert torch.equal(nearest, torch.floor(i * (CROP / SMALL)))
    assert torch.equal(aligned, 4.0 * i)
    assert sorted(set((aligned - nearest).long().tolist())) == [0, 1, 2, 3]


def test_contrastive_inputs_as_released_are_the_releases(release, ours):
    label_l, label_u, prob_l, prob_u, low_mask, high_mask = release["inputs"]
    labels, probs, low, high = ours["inputs"]
    assert torch.equal(ours["pseudo_labels"], release["pseudo_labels"])
    onehot = torch.cat([release_label_onehot(labels[:NUM_LABELLED], C), release_label_onehot(labels[NUM_LABELLED:], C)])
    assert torch.equal(onehot, torch.cat([label_l, label_u]).bool())
    assert torch.equal(low, low_mask[:, 0].bool()) and torch.equal(high, high_mask[:, 0].bool())
    # Bilinear with align_corners=True at 769 -> 193 weights one full-resolution pixel by exactly 1, so only the
    # softmax can round differently: the two sides softmax batches of different composition (one batch here, the
    # labelled and unlabelled ones there), and a CPU's vectorised exp and 19-term sum may round each in its own
    # order: within 19 float32 eps of a probability <= 1 (equal bit for bit with one thread).
    torch.testing.assert_close(probs, torch.cat([prob_l, prob_u]), rtol=0, atol=19 * torch.finfo(torch.float32).eps)
    # Only labelled image 0 has labels, the union of the four (B7): up to 4 classes, and road from ignored pixels.
    assert label_l.sum((1, 2, 3)).tolist()[1:] == [0, 0, 0] and int(label_l[0].sum(0).max()) >= 3


def test_as_released_draw_equals_the_releases_at_its_shapes(step, release, ours):
    sampled, memobank, draw, queues = release["sampled"], release["memobank"], ours["draw"], ours["queues"]
    # The same negatives pushed, in the same order: few (the audit's replay: 10-23 a step without mixing, 18-57 with
    # ACM), all from the unlabelled image (a labelled negative must be and not be of its class, B8).
    pushed = sum(sampled["pushed"])
    assert 0 < pushed < 1000
    assert (queues.length - PREFILLED).tolist() == sampled["pushed"]
    for c in range(C):
        assert torch.equal(queues.get(c), memobank[c][0]), c
    # The same anchors (the student's features at the same pixels), prototypes and negative keys, paired as released:
    # class i's anchors and prototype with the queue of the i-th class present (U2PL issue #111), here different
    # classes from class 13 on.
    assert any(i != c for i, c in sampled["pairs"])
    rep_p = step["rep_student"].permute(0, 2, 3, 1).reshape(-1, D)
    anchors = rep_p.index_select(0, draw.anchor_pixels).split(SAMPLING["num_queries"])
    assert len(anchors) == len(sampled["anchors"]) > 0 and draw.num_present == len(sampled["valid_classes"])
    for a, b in zip(anchors, sampled["anchors"]):
        assert torch.equal(a, b)
    # Prototypes: means of up to 4 x 193 x 183 + 193 x 193 float32 features, summed by a matrix product here and by
    # torch.mean there; the rounding of such sums stays near 1e-6 relative (float32 eps 6e-8 times the depth of a
    # blocked or pairwise sum), while one pixel more or less moves a mean of ~5000 unit-variance features by ~1e-4.
    for p, q in zip(draw.prototypes, sampled["prototypes"]):
        assert torch.allclose(p, F.normalize(q, dim=-1, eps=1e-8), rtol=0, atol=1e-5)
    for n, m in zip(draw.negatives, sampled["negatives"]):
        assert torch.allclose(n, F.normalize(m, dim=-1, eps=1e-8), rtol=0, atol=1e-6)
    # The loss: cross-entropies of 51 cosines / 0.5 in [-2, 2]; 1e-5 relative bounds the rounding of the
    # normalisations (ours: F.normalize then dot products; the release: torch.cosine_similarity) and prototypes.
    assert release["loss"] > 0
    assert float(ours["loss"]) == pytest.approx(float(release["loss"]), rel=1e-5)


def test_u2pl_paper_rule_pushes_thousands_of_times_more_negatives(step, ours):
    # The default (U2PL's paper, B8): negatives are the pixels not of the class with the class in the teacher's top 3
    # (labelled: about two per labelled pixel) or at ranks 3-19 (unlabelled), read at centred pixels.
    paper = _ours(step, as_released=False, prefill=False)["queues"]
    pushed_paper, pushed_released = int(paper.length.sum()), int(ours["queues"].length.sum()) - C * PREFILLED
    assert pushed_paper > 2e5 and pushed_paper > 1000 * pushed_released > 0
