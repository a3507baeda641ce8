"""Every config key uda_plugins adds to Detectron2's, with its default and why it exists.

Call :func:`add_uda_config` on a fresh ``get_cfg()`` before ``merge_from_file`` (yacs rejects unknown keys with
``KeyError: 'Non-existent config key: <KEY>'``, which is how a misspelt key fails). Keys Detectron2 already has
(``SOLVER.BASE_LR``, ``MODEL.SEM_SEG_HEAD.NUM_CLASSES``, ``TEST.EVAL_PERIOD``, ``VIS_PERIOD`` ...) keep their
Detectron2 meaning; for a few of them this function sets a project-wide default (marked "project default").

Batch sizes are *global* (summed over all processes), as Detectron2's ``SOLVER.IMS_PER_BATCH``.
Sizes are ``(height, width)`` in pixels everywhere.
"""

from __future__ import annotations

from uda_plugins.d2 import CfgNode as CN
from uda_plugins.d2 import get_cfg

__all__ = ["add_uda_config", "get_uda_cfg"]


def _add_resize(node: CN, resize) -> None:
    # Resize to (h, w) before anything else; (0, 0) keeps the original size. RESIZE_MODE: "keep_ratio" fits the
    # image inside (h, w) keeping its aspect ratio (mmseg's keep_ratio: DAFormer, HRDA, MIC); "exact" stretches it
    # to (h, w) whatever its aspect ratio (MCL's img_size, DUDA's resize, ILM-ASSL's 2048x1024 source images).
    node.RESIZE = resize
    node.RESIZE_MODE = "keep_ratio"
    # Scaled sides are "round"ed (mmcv's int(x + 0.5)) or "floor"ed (int(x): DUDA, MCL, ILM-ASSL).
    node.SIZE_ROUNDING = "round"
    # Images are resized "bilinear" (cv2, mmcv's default), "lanczos" (PIL's, antialiased when shrinking: DUDA's
    # Image.ANTIALIAS) or "pil_bilinear" (PIL's BILINEAR, antialiased too: MCL's); labels by nearest neighbour, PIL's
    # (pixel centres) with a PIL filter, as those releases, cv2's otherwise.
    node.INTERPOLATION = "bilinear"


def _add_domain_input(node: CN, *, resize, crop, cat_max_ratio: float, flip: float) -> None:
    _add_resize(node, resize)
    # Multiply the resized size by a random factor from this range (1, 1 = no random scaling), drawn "uniform"ly
    # or "split_at_one": from (lo, 1) or (1, hi) with probability 1/2 each (ILM-ASSL / U2PL's RandResize).
    node.RATIO_RANGE = (1.0, 1.0)
    node.RATIO_SAMPLING = "uniform"
    # With RESIZE_MODE exact: resample the image (and label) to RESIZE first, then to the random scale, as the
    # releases that stretch every image in the dataset and scale it in the augmentation (MCL, DUDA); False resamples
    # once, from the original size.
    node.RESAMPLE_TWICE = False
    # Random crop (h, w) after resizing; (0, 0) disables cropping.
    node.CROP_SIZE = crop
    # A crop larger than the scaled image is padded at the "bottom_right" (mmseg's Pad after RandomCrop), or
    # "center"ed (half the padding before, then the offset drawn in the padded image: ILM-ASSL's Crop), or "none":
    # cut to the image, so a batch can mix sizes (refused when training starts where that can happen).
    node.CROP_PAD = "bottom_right"
    # Padded image pixels get these 0..255 values per channel; () = the pixel mean, i.e. 0 after normalisation (up
    # to uint8 rounding), as mmseg and ILM-ASSL pad the normalised image. Padded label pixels get the ignore value
    # (-1), or this class id (ILM-ASSL's release pads with 0 = road; its configs set it).
    node.CROP_PAD_IMAGE = ()
    node.CROP_PAD_LABEL = -1
    # Re-draw the crop (up to 10 times) while one class covers more than this fraction of its labelled
    # pixels (mmseg's cat_max_ratio). Needs labels, so it is ignored on unlabelled target images.
    node.CROP_CAT_MAX_RATIO = cat_max_ratio
    # Probability of a horizontal flip.
    node.FLIP_PROB = flip


def add_uda_config(cfg: CN) -> None:
    """Add the keys of this project to ``cfg`` (a Detectron2 ``get_cfg()``) in place."""
    _C = cfg

    # ------------------------------------------------------------------ datasets
    # Labelled source datasets; several names are concatenated into one source domain.
    _C.DATASETS.SOURCE_TRAIN = ("synthetic_source_train",)
    # Unlabelled target domains: one entry per target domain (multi-target methods use several); every batch
    # holds IMS_PER_BATCH_TARGET images of each.
    _C.DATASETS.TARGET_TRAIN = ("synthetic_target_train",)
    # DATASETS.TEST (Detectron2's key) names the evaluation sets.
    # YAML/JSON files describing your own image-folder datasets (name -> images, labels, classes, label_suffix;
    # uda_plugins/data/datasets/image_folder.py), registered before any dataset is looked up.
    _C.DATASETS.REGISTER = ()
    # A few labelled target images (semi-supervised / active-learning adaptation, STAL): a list file naming images
    # of DATASETS.TARGET_TRAIN[0] (tools/active_learning_round.py writes them; the authors' lists read too), or
    # "random:<n>" for n images drawn at random (per-folder quotas, seeded by SEED) as a seed set. They
    # join the source stream with their ground truth, cycled through TARGET_LABELED_ENTRIES entries of it:
    # -1 = as many as the target images not in the list (ILM-ASSL's oversampling: 2975 - n for Cityscapes).
    _C.DATASETS.TARGET_LABELED_LIST = ""
    # Train on a subset of the source images only: a list file naming images of DATASETS.SOURCE_TRAIN (e.g.
    # ILM-ASSL's labeled_gtav2000.txt) or "random:<n>" (n at random, seeded by SEED); "" = all of them.
    _C.DATASETS.SOURCE_LIST = ""
    _C.DATASETS.TARGET_LABELED_ENTRIES = -1
    # The unlabelled stream of DATASETS.TARGET_TRAIN[0] (and what draws from it: STAL's CutMix partners) leaves out
    # the images of DATASETS.TARGET_LABELED_LIST, as ILM-ASSL's unlabeled.txt is the complement of its labeled.txt;
    # False: every target image is also an unlabelled one.
    _C.DATASETS.TARGET_EXCLUDE_LABELED = False

    # ------------------------------------------------------------------ rare-class sampling (DAFormer)
    _C.DATALOADER.RCS = CN()
    # DAFormer's rare-class sampling of the source stream (lhoyer/MIC seg/mmseg/datasets/uda_dataset.py): each
    # source sample first draws a class c with P(c) = softmax((1 - f_c) / TEMPERATURE), f_c = c's share of all
    # labelled source pixels, then uniformly one source image with > MIN_PIXELS pixels of c. Targets stay uniform.
    _C.DATALOADER.RCS.ENABLED = False
    # Softmax temperature: smaller draws rare classes more often (DAFormer/HRDA/MIC: 0.01).
    _C.DATALOADER.RCS.TEMPERATURE = 0.01
    # An image is eligible for class c when its label file, at its stored resolution, has more than this many
    # pixels of c (3000 for GTA5/SYNTHIA). Classes no image reaches are not drawn (a warning names them).
    _C.DATALOADER.RCS.MIN_PIXELS = 3000
    # Re-draw the image's random resize/crop/flip until the crop has > MIN_PIXELS * MIN_CROP_RATIO pixels of c
    # (0.5 for 512x512 crops, 2.0 for HRDA's 1024x1024 crops; 0 keeps the first draw) ...
    _C.DATALOADER.RCS.MIN_CROP_RATIO = 0.5
    # ... at most this many times (the reference's 10); the last draw is kept even when it misses c.
    _C.DATALOADER.RCS.CROP_REDRAWS = 10
    # Folder of the per-image class-pixel caches (tools/compute_class_stats.py). "": beside each source dataset's
    # label folder, or ~/.cache/uda_plugins/class_stats where that is not writable. Missing or stale caches are
    # computed by the main process when training starts.
    _C.DATALOADER.RCS.STATS_DIR = ""

    # ------------------------------------------------------------------ input
    # Channel order of MODEL.PIXEL_MEAN/STD and of the images the network sees, i.e. of its pretrained first layer
    # (project default RGB; "BGR" for Caffe-style weights such as DUDA's). Images are decoded, augmented and shown
    # as RGB and converted once, where Segmentor.normalize feeds the network, in training, evaluation and prediction.
    _C.INPUT.FORMAT = "RGB"
    _C.INPUT.SOURCE = CN()
    _add_domain_input(_C.INPUT.SOURCE, resize=(0, 0), crop=(0, 0), cat_max_ratio=1.0, flip=0.5)
    _C.INPUT.TARGET = CN()
    _add_domain_input(_C.INPUT.TARGET, resize=(0, 0), crop=(0, 0), cat_max_ratio=1.0, flip=0.5)
    _C.INPUT.TEST = CN()
    # Test images are resized as INPUT.*.RESIZE / RESIZE_MODE / SIZE_ROUNDING say; predictions are resized back to
    # the original size before they are scored against the full-resolution label.
    _add_resize(_C.INPUT.TEST, (0, 0))

    # ------------------------------------------------------------------ dataloader
    # DATALOADER.NUM_WORKERS (Detectron2's key): worker processes building whole UDA batches.

    # ------------------------------------------------------------------ model
    # ImageNet statistics in RGB order, 0..255 (project default; Detectron2's is Caffe BGR).
    _C.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    _C.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    _C.MODEL.META_ARCHITECTURE = "SourceOnly"  # project default
    # Keep every network's weights and the segmentors' inputs in channels-last memory (NHWC): faster convolutions
    # with tensor cores under AMP on a GPU; the same numbers up to floating-point rounding.
    _C.MODEL.CHANNELS_LAST = False
    _C.MODEL.COMPILE = CN()
    # torch.compile every segmentor's networks (backbone, decode heads, HRDA's scale attention) in place, in the
    # student, the teacher and every other copy: checkpoints keep their keys and load either way. The first
    # iterations (and the first evaluation) include the compilation; a new input size compiles again.
    _C.MODEL.COMPILE.ENABLED = False
    # torch.compile's backend ("inductor" generates kernels; "aot_eager" only traces, for checking a model
    # compiles) and mode ("default", "reduce-overhead" for CUDA graphs, "max-autotune").
    _C.MODEL.COMPILE.BACKEND = "inductor"
    _C.MODEL.COMPILE.MODE = "default"
    _C.MODEL.BACKBONE.NAME = "build_dilated_resnet_backbone"
    # Names of the backbone outputs, shallow to deep (res2..res5 for both ResNets and MiT).
    _C.MODEL.BACKBONE.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Normalisation in the backbone: "BN", "SyncBN", "FrozenBN" (statistics and affine frozen) or "GN".
    _C.MODEL.BACKBONE.NORM = "BN"
    # Local file with ImageNet weights for the encoder (timm, torchvision or mmseg/mmcv key names). Empty:
    # random initialisation. Nothing is ever downloaded.
    _C.MODEL.BACKBONE.PRETRAINED = ""
    _C.MODEL.TIMM = CN()
    # The timm architecture: resnet18/34/50/101/152 (dilated ResNets), mit_b0..mit_b5 (SegFormer's MiT encoders, as
    # released) or a timm pvt_v2_* (timm's PVTv2: pvt_v2_b5 is MiT-B5, pvt_v2_b0..b4 have wider MLPs than MiT-B0..B4).
    _C.MODEL.TIMM.ARCH = "resnet101"
    # ResNets only: 8 dilates the last two stages (DeepLab), 16 the last one, 32 none.
    _C.MODEL.TIMM.OUTPUT_STRIDE = 8
    # ResNets only: "pytorch" (timm's and torchvision's: a stage's stride on its first 3x3 conv), or "caffe", the
    # DeepLab-V2 ResNet of AdaptSegNet, ADVENT, DUDA and MCL (the stride on the first 1x1 conv, the stem max-pool with
    # ceil_mode, every block of a dilated stage dilated); the same weights either way.
    _C.MODEL.TIMM.STYLE = "pytorch"
    # ResNets only: "" is the 7x7 stem; "deep" the three 3x3 convs of ResNet-v1c (mmseg's "r101v1c").
    _C.MODEL.TIMM.STEM = ""
    # ResNets only: width of the deep stem's first convs (v1c uses 32 -> 32 -> 64).
    _C.MODEL.TIMM.STEM_WIDTH = 32
    # ResNets only: override the per-stage widths / block counts (small CPU models); () = the architecture's.
    _C.MODEL.TIMM.CHANNELS = ()
    _C.MODEL.TIMM.LAYERS = ()
    # ResNets only: DeepLab-V3's multi-grid, the last stage's block i dilated by its stage dilation x MULTI_GRID[i]
    # (U2PL / ILM-ASSL's ResNet-101: (1, 2, 4) at output stride 8 = dilations 4, 8, 16); () = timm's.
    _C.MODEL.TIMM.MULTI_GRID = ()
    # Stochastic depth rate (MiT in DAFormer uses 0.1).
    _C.MODEL.TIMM.DROP_PATH_RATE = 0.0

    # The decode head (DeepLabV2Head, SegFormerHead or DAFormerHead), the backbone outputs it reads, and the number
    # of classes (project defaults: DeepLab-V2 on res5, the 19 Cityscapes classes).
    _C.MODEL.SEM_SEG_HEAD.NAME = "DeepLabV2Head"
    _C.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res5"]
    _C.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 19
    # Norm inside the decode heads ("BN", "SyncBN", "GN", "" = none; project default BN, as DAFormer/SegFormer).
    _C.MODEL.SEM_SEG_HEAD.NORM = "BN"
    # DeepLabV2 classifier: one 3x3 conv per dilation, summed (6, 12 is DAFormer's "dlv2red").
    _C.MODEL.SEM_SEG_HEAD.ASPP_DILATIONS = (6, 12, 18, 24)
    # SegFormer / DAFormer heads: width of the per-level embeddings.
    _C.MODEL.SEM_SEG_HEAD.EMBED_DIM = 256
    # DAFormer head: dilations of the depthwise-separable context-aware fusion.
    _C.MODEL.SEM_SEG_HEAD.FUSION_DILATIONS = (1, 6, 12, 18)
    # The supervised cross-entropy's average: "all_pixels", ignored ones counted in the denominator (mmseg's, the
    # DACS/DAFormer/HRDA/MIC releases'), or "labelled_pixels" (torch's ignore_index mean: DUDA's release).
    _C.MODEL.SEM_SEG_HEAD.LOSS_AVERAGE = "all_pixels"
    # Dropout before the classifier (DeepLab-V2: a channel dropout of the deepest feature before the ASPP, DUDA's 0.5;
    # DAFormer's DeepLab-V2 configs set 0).
    _C.MODEL.SEM_SEG_HEAD.DROPOUT = 0.1

    # ------------------------------------------------------------------ HRDA multi-resolution training
    _C.MODEL.HRDA = CN()
    # Wrap the segmentor in HRDA's context + detail scales (lhoyer/MIC hrda_encoder_decoder.py / hrda_head.py).
    _C.MODEL.HRDA.ENABLED = False
    # Input scales (context, detail): the context view is the whole crop resized by the first, the detail view a
    # crop of the image resized by the second (which must be 1.0: the label is cropped with the same box).
    _C.MODEL.HRDA.SCALES = (0.5, 1.0)
    # Detail crop (h, w) in pixels of the detail-scale image, clamped to the image; (0, 0) = the whole image.
    _C.MODEL.HRDA.HR_CROP_SIZE = (512, 512)
    # Detail-crop offsets are multiples of this (8 = head stride 4 / context scale 0.5: aligned fusion).
    _C.MODEL.HRDA.CROP_COORD_DIVISIBLE = 8
    # Loss = (1 - HR - LR) * CE(fused) + HR * CE(detail logits, label in the box) + LR * CE(context logits).
    _C.MODEL.HRDA.HR_LOSS_WEIGHT = 0.1
    _C.MODEL.HRDA.LR_LOSS_WEIGHT = 0.0
    # One scale attention per class channel (True) or a single map for all classes (the "singleatt" ablation).
    _C.MODEL.HRDA.ATTENTION_CLASSWISE = True
    # Width of the scale-attention head's embeddings and fusion conv when the decode head is a DAFormerHead.
    _C.MODEL.HRDA.ATTENTION_EMBED_DIM = 256
    # >= 0: a constant scale attention instead of the learned head (the "fixedatt" ablation uses 0.5); -1 = learned.
    _C.MODEL.HRDA.FIXED_ATTENTION = -1.0
    # Inference (pseudo-labels, test): the detail logits come from sliding HR_CROP_SIZE windows over the whole
    # image (True) or from one pass over the whole full-resolution image (False).
    _C.MODEL.HRDA.HR_SLIDE_INFERENCE = True
    # Those windows overlap by half (stride = HR_CROP_SIZE // 2) or tile the image (stride = HR_CROP_SIZE).
    _C.MODEL.HRDA.HR_SLIDE_OVERLAPPING = True
    # Replace the detail view by the image down- and up-sampled by 0.5 (the "blurhr" ablation).
    _C.MODEL.HRDA.BLUR_HR_CROP = False
    # The scale (one of SCALES) whose encoder features forward_train returns for the feature distance.
    _C.MODEL.HRDA.FEATURE_SCALE = 0.5
    # Reproduce the reference's detail-crop offsets, randint(0, (margin + 1) // CROP_COORD_DIVISIBLE) *
    # CROP_COORD_DIVISIBLE, which never draws the last aligned offset (the box never touches the bottom/right
    # edge). False (fixed): every multiple of CROP_COORD_DIVISIBLE in [0, margin].
    _C.MODEL.HRDA.REFERENCE_CROP_OFFSETS = False
    # Reproduce the reference's LR loss on the attention-weighted context logits (1 - att) * LR instead of the
    # context logits themselves (only matters when LR_LOSS_WEIGHT > 0).
    _C.MODEL.HRDA.LR_LOSS_ON_ATTENDED_LOGITS = False

    # ------------------------------------------------------------------ self-training (DACS / DAFormer / MIC)
    _C.UDA = CN()
    _C.UDA.TEACHER = CN()
    # EMA teacher: after the k-th optimizer step, teacher <- a_k * teacher + (1 - a_k) * student over the
    # parameters (not the BN buffers), a_k = min(1 - 1/(k + 1), ALPHA). 0.99 in DACS's base config, 0.999 in
    # the DAFormer/HRDA/MIC experiments ("a999").
    _C.UDA.TEACHER.ALPHA = 0.99
    # ALPHA = 1.0 makes a_k = k / (k + 1): the teacher is the uniform running mean of the student's weights since
    # self-training started (torch.optim.swa_utils.AveragedModel, DUDA's "mean model").

    _C.UDA.PSEUDO_LABEL = CN()
    # Quality weight of the target pseudo-labels = fraction of target-batch pixels whose teacher confidence is
    # >= THRESHOLD (one scalar per rank's batch, as the single-GPU reference).
    _C.UDA.PSEUDO_LABEL.THRESHOLD = 0.968
    # DAFormer's "croppl": zero the pseudo-label weight of this many rows at the top / bottom of each target
    # crop (15 / 120 for 512x512 Cityscapes crops); 0 disables.
    _C.UDA.PSEUDO_LABEL.IGNORE_TOP = 0
    _C.UDA.PSEUDO_LABEL.IGNORE_BOTTOM = 0
    # HRDA/MIC's variant: margins (top, bottom, left, right) in pixels of the *original* target frame whose
    # pseudo-labels get weight 0, wherever the crop falls ((30, 240, 30, 30) on 1024x2048 Cityscapes). Exclusive
    # with IGNORE_TOP/IGNORE_BOTTOM, as in the reference.
    _C.UDA.PSEUDO_LABEL.FRAME_MARGINS = (0, 0, 0, 0)

    _C.UDA.MIX = CN()
    # "class": DACS ClassMix (half of the source classes pasted onto the target); "none": train on the
    # strongly augmented target image itself (plain mean-teacher self-training).
    _C.UDA.MIX.MODE = "class"
    # Reference quirk (lhoyer/MIC dacs_transforms.get_class_masks): draw the classes from the labels of the
    # whole source batch, the ignore label included. False (default): from each image's own labelled classes.
    _C.UDA.MIX.CLASSES_FROM_BATCH = False

    _C.UDA.STRONG_AUG = CN()
    # Colour jitter (brightness, contrast, saturation, hue, each of this strength) applied with probability
    # 1 - COLOR_JITTER_SKIP_PROB (the reference's color_jitter_probability 0.2 means "skip when U < 0.2").
    _C.UDA.STRONG_AUG.COLOR_JITTER_STRENGTH = 0.2
    _C.UDA.STRONG_AUG.COLOR_JITTER_SKIP_PROB = 0.2
    # Gaussian blur (sigma ~ U(0.15, 1.15), kernel ~10% of the image side) with probability 0.5.
    _C.UDA.STRONG_AUG.BLUR = True

    _C.UDA.FD = CN()
    # DAFormer's thing-class ImageNet feature distance on source images: weight (0 = off; 0.005 in DAFormer).
    _C.UDA.FD.LAMBDA = 0.0
    # Classes whose feature cells are pulled towards the frozen ImageNet encoder (Cityscapes things).
    _C.UDA.FD.CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)
    # A feature cell takes a class only if at least this fraction of its pixels have it (else it is ignored).
    _C.UDA.FD.SCALE_MIN_RATIO = 0.75
    # The encoder output compared (the bottleneck: the last stage).
    _C.UDA.FD.FEATURE = "res5"

    _C.UDA.MIC = CN()
    # Masked image consistency: weight of the loss on masked target images (0 = off; 1 in MIC).
    _C.UDA.MIC.LAMBDA = 0.0
    # Square blocks of this many input pixels are dropped with probability RATIO.
    _C.UDA.MIC.BLOCK_SIZE = 64
    _C.UDA.MIC.RATIO = 0.7
    # Release quirk (masking_consistency_module.py L119-131): the masked images' strong augmentation is one draw for
    # the whole batch (one jitter order, one blur sigma) and its blur is drawn even with UDA.STRONG_AUG.BLUR False.
    # False (our fix): each image its own draw, like ClassMix's, and BLUR applies.
    _C.UDA.MIC.STRONG_AUG_AS_RELEASED = False
    # Release quirk (L142-143): LAMBDA scales only 'decode.loss_seg', for HRDA the fused term, not the detail and
    # context terms. False (our fix, the paper's lambda * L_MIC): the whole loss. Equal at LAMBDA 1.
    _C.UDA.MIC.LAMBDA_ON_FUSED_LOSS = False

    _C.UDA.GUIDANCE = CN()
    # Guidance Training (uda_plugins/methods/guidance.py): weight of the loss of the Guider-reconstructed mixed
    # features against the pseudo-label of the unmixed target image (0 = off; 1 in the authors' code).
    _C.UDA.GUIDANCE.LAMBDA = 0.0
    # The per-image weight 1 - exp(-EXPONENT * r), r = the fraction of the image still target after mixing.
    _C.UDA.GUIDANCE.EXPONENT = 5.0
    # The encoder level the Guider reconstructs ("" = the deepest level the decode head reads, as the authors);
    # the head's other levels are masked with learnable tokens.
    _C.UDA.GUIDANCE.FEATURE = ""
    # The Guider's transformer: blocks, width, heads, MLP ratio, and the patch size on the feature map.
    _C.UDA.GUIDANCE.DEPTH = 2
    _C.UDA.GUIDANCE.EMBED_DIM = 512
    _C.UDA.GUIDANCE.NUM_HEADS = 16
    _C.UDA.GUIDANCE.MLP_RATIO = 4.0
    _C.UDA.GUIDANCE.PATCH_SIZE = 4
    # The guidance loss's pixel weights (and the MIC loss's after it), f = 1 - exp(-EXPONENT r): "mean" (our fix):
    # w = q mean_views(f), MIC q; "as_released" (the released code's in-place aliasing; HRDA: w = q (f_ctx +
    # f_ctx f_det) / 2, MIC q f_ctx f_det); "logged" (the older code of the published run, commented out in the
    # release: w = MIC's = q f(r of the whole mixed image)). What is known of each: methods/guidance.py.
    _C.UDA.GUIDANCE.WEIGHTING = "mean"
    _C.register_renamed_key(
        "UDA.GUIDANCE.REFERENCE_WEIGHT_ALIASING",
        "UDA.GUIDANCE.WEIGHTING",
        "True is WEIGHTING as_released, False is WEIGHTING mean",
    )

    _C.UDA.QUADMIX = CN()
    # UDASS / QuadMix (uda_plugins/methods/quad_mix.py, ZHE-SAPI/UDASS ok/dacs_gta.py): from this iteration on,
    # DACS's ClassMix loss is replaced by the two "quad" losses mixing the previous and the current batch; before
    # it the step is DACS/MIC as configured (reference: 6000 ViT, 7000 GTA-CNN, 6001 SYNTHIA-CNN of 40000).
    _C.UDA.QUADMIX.START_ITER = 6000
    # Classes per mask: of the previous source label for the S2S/S2T mask, and of the previous target pseudo-label
    # for the T2* mask (fewer when the image has fewer).
    _C.UDA.QUADMIX.CLASSES_PER_MASK = 2
    # The target mask keeps only pixels whose teacher confidence (max softmax) was >= this.
    _C.UDA.QUADMIX.CONFIDENCE = 0.9
    # Weight of each of loss_quad_ss and loss_quad_st.
    _C.UDA.QUADMIX.LOSS_WEIGHT = 0.5
    # Source classes pasted on the T2* images, P(c) proportional to how often c is listed (repeats allowed).
    # Reference: GTA5 (3, 4, 5, 6, 12, 15, 16, 17, 18); SYNTHIA (3, 3, 4, 4, 4, 4, 5, 5, 6, 7, 12, 13, 18). A
    # class no source image has (more than RARE_MIN_PIXELS of) is dropped with a warning.
    _C.UDA.QUADMIX.RARE_CLASSES = (3, 4, 5, 6, 12, 15, 16, 17, 18)
    # A pasted object comes from a source image with more than this many pixels of its class (label file at its
    # stored resolution), whose crop is re-drawn (DATALOADER.RCS.CROP_REDRAWS times at most) until it holds more
    # than this many (reference: 50 GTA5 / 10 SYNTHIA on 1024x1024 crops; RARE_OBJECTS_AS_RELEASED: a new image
    # until the crop holds more).
    _C.UDA.QUADMIX.RARE_MIN_PIXELS = 50
    # Rare objects pasted on each T2SS and each T2ST image (reference 2); 0 disables pasting and its loader
    # stream.
    _C.UDA.QUADMIX.PASTE_PER_IMAGE = 2
    # Reproduce the reference's quirks (docs/methods.md §4.7): the source mask may choose the ignore label as a
    # class; the target mask excludes the source mask's positions in unique(label) instead of its class ids; pasted
    # rare objects keep the pixel weight beneath them instead of 1. False: all three fixed.
    _C.UDA.QUADMIX.REFERENCE_QUIRKS = False
    # How the pasted rare objects are normalised (Q1): "model", as every other image (MODEL.PIXEL_MEAN/PIXEL_STD), or
    # "as_released", UDASS's rand_mixer (ok/dacs_gta.py:226-228): the RGB object in BGR order minus the RGB-order
    # means, divided by 255; low-contrast, channel-swapped objects that the colour jitter then denormalises with the
    # model's mean and std, as the rest of the image.
    _C.UDA.QUADMIX.PASTE_NORMALIZATION = "model"
    # Draw the rare objects as released (Q4, rand_mixer and ok/dacs_gta.py:695-698): PASTE_PER_IMAGE distinct entries
    # of RARE_CLASSES per iteration, shared by every quad image (object p of each has the p-th class); each object
    # from a source image holding its class drawn uniformly, stretched to RARE_RESIZE whatever its aspect ratio (PIL
    # bilinear / nearest), a random crop of INPUT.SOURCE.CROP_SIZE, no flip, and a new image drawn until the crop
    # holds more than RARE_MIN_PIXELS of the class. False: each object draws its class and passes the source pipeline.
    _C.UDA.QUADMIX.RARE_OBJECTS_AS_RELEASED = False
    # (h, w) the rare objects are stretched to when drawn as released (the reference: 1024 x 2048 for both sources).
    _C.UDA.QUADMIX.RARE_RESIZE = (1024, 2048)
    # Copy the student's parameters into the teacher so that the step of iteration RESET_TEACHER_ITER sees teacher =
    # student, then average on (Q2): the authors resume a MIC checkpoint and re-initialise the EMA teacher at the
    # iteration they hard-code (ok/dacs_gta.py:259, 511-515: 4000 ViT-GTA, 3000 ViT-SYNTHIA, 6000 CNN), the following
    # updates at alpha = min(1 - 1/(it+1), UDA.TEACHER.ALPHA). False: the teacher carries on.
    _C.UDA.QUADMIX.RESET_TEACHER = False
    _C.UDA.QUADMIX.RESET_TEACHER_ITER = 4000

    _C.UDA.MCL = CN()
    # MCL (uda_plugins/methods/mcl.py, feifei-cv/MCL@b91c947): one head per DATASETS.TARGET_TRAIN entry on a shared
    # backbone. Two stages, two runs (as the authors' pretrain.sh and train.sh): "warm_up" = ADVENT-style
    # output-level adversarial training, one discriminator per target; "self_training" (their "stage1") = soft
    # pseudo-labels, collaborative and ensemble self-training and distillation into a domain-agnostic head, from the
    # warm-up's weights (MODEL.WEIGHTS; the new heads start fresh).
    _C.UDA.MCL.STAGE = "warm_up"
    # Weight of the generator (adversarial) term per target (MCL's pretrain.sh: 0.001, vanilla GAN = BCE).
    _C.UDA.MCL.ADV_WEIGHT = 0.001
    # The discriminators' own Adam (stepped with the segmenter's optimizer, the same poly schedule).
    _C.UDA.MCL.DISCRIMINATOR_LR = 1e-4
    _C.UDA.MCL.DISCRIMINATOR_BETAS = (0.9, 0.99)
    _C.UDA.MCL.DISCRIMINATOR_WIDTH = 64
    # BatchNorm of the backbone in eval mode and not trained (the warm-up's --freeze_bn; needs pretrained weights;
    # the authors' self-training stage trains it: False there).
    _C.UDA.MCL.FREEZE_BN = True
    # The head evaluation uses for every test set: "" = the stage's (warm-up: the last target's, as the reference
    # validates it; self-training: "agnostic", the deployed model), or a head name ("target0", ..., "agnostic").
    _C.UDA.MCL.EVAL_HEAD = ""
    # Self-training: the soft pseudo-labels of every target image (each target's own head, whole image at
    # INPUT.TARGET.RESIZE, class probabilities at the head's resolution, float16) are made when the stage starts
    # and remade before every REFRESH_PERIOD-th iteration (the authors: 10000 of 60000; 0 = never).
    _C.UDA.MCL.REFRESH_PERIOD = 10000
    # A step reads them at this fraction of the crop size (the authors: 0.25), keeps each pixel whose normalised
    # entropy is below max(ENTROPY_FLOOR, its class's median entropy in the batch) (0.25), and replays the strong
    # view's geometry on them.
    _C.UDA.MCL.PSEUDO_LABEL_SCALE = 0.25
    _C.UDA.MCL.ENTROPY_FLOOR = 0.25
    # The strong target view: FixMatch's RandAugment(n, m) with a Cutout of a third of the side (the authors: 2, 10).
    _C.UDA.MCL.RAND_AUGMENT_N = 2
    _C.UDA.MCL.RAND_AUGMENT_M = 10
    # Loss weights per target: collaborative (the authors' --ratio 1.0), ensemble (0.05), distillation (1.0); target
    # self-training terms weighted by exp(-GAMMA * KL) agreement between the heads (--rectify, gamma 1.0).
    _C.UDA.MCL.COLLABORATIVE_WEIGHT = 1.0
    _C.UDA.MCL.ENSEMBLE_WEIGHT = 0.05
    _C.UDA.MCL.DISTILLATION_WEIGHT = 1.0
    _C.UDA.MCL.RECTIFY = True
    _C.UDA.MCL.GAMMA = 1.0
    # The ensemble head reads one feature per target style. "domain": slot k is always the image in target k's
    # style (source and target side alike); "own_first": the reference's target side (own style first, then the
    # others), which swaps the slots against its source side.
    _C.UDA.MCL.ENSEMBLE_ORDER = "domain"
    # How the individual, collaborative and ensemble target terms reduce CE x agreement weight over the pixels:
    # "masked_mean" (sum over the selected pixels / their number) or "batch_broadcast", as released
    # (models/adaptation_modelv2.py:236,296-304: the (B,1,h,w) mask times the (B,h,w) loss broadcasts to (B,B,h,w),
    # 2-4x the masked mean at the release's batch of 4; over each process's batch here).
    _C.UDA.MCL.TARGET_LOSS_REDUCTION = "masked_mean"
    # Reinhard colour transfer: "float" (L*a*b* in floating point on the device) or "opencv_uint8", as released
    # (color.py:8-71 via adaptation_modelv2.py:347-355: 8-bit BGR images truncated from x/255*255, OpenCV's 8-bit
    # L*a*b*, the result truncated to uint8).
    _C.UDA.MCL.COLOR_TRANSFER = "float"

    _C.UDA.PSEUDO_LABEL_BANK = CN()
    # Offline pseudo-label banks (uda_plugins/data/pseudo_label_bank.py) live in OUTPUT_DIR/pseudo_label_bank/<target
    # dataset>/; the bank states of the newest SOLVER.MAX_CHECKPOINTS_TO_KEEP checkpoints (+ model_final) stay
    # restorable. The initial bank: a folder of uint8 PNGs named like the images (<folder>/<path relative to the
    # images' common folder>.png, or <folder>/<file name>.png), e.g. made by tools/generate_pseudo_labels.py; "" =
    # generate it from the model when self-training starts, with IAST's instance-adaptive selection:
    _C.UDA.PSEUDO_LABEL_BANK.INITIAL_DIR = ""
    # ... keep about this fraction of each class's pixels (IAST 0.2; DUDA's "pseudo_label_0.45": 0.45), with
    # this momentum of the running class thresholds and this exponent (IAST: 0.9 and 8).
    _C.UDA.PSEUDO_LABEL_BANK.IAS_PROPORTION = 0.45
    _C.UDA.PSEUDO_LABEL_BANK.IAS_MOMENTUM = 0.9
    _C.UDA.PSEUDO_LABEL_BANK.IAS_GAMMA = 8.0

    _C.UDA.ACTIVE = CN()
    # Active-learning rounds inside one run (uda_plugins/hooks/active_learning.py; any method): after iteration
    # ROUND_ITERS[k] - 1, ROUND_IMAGES[k] more images of DATASETS.TARGET_TRAIN[0] are picked by STRATEGY ("entropy":
    # the most uncertain by mean normalised pixel entropy under NETWORK, "teacher" where the method has one, as
    # ILM-ASSL; "random") with per-city quotas (QUOTA_RULE "largest_remainder", or "reference": ILM-ASSL's rounding),
    # their ground truth revealed, and the labelled pool (DATASETS.TARGET_LABELED_LIST's seed set + every round) feeds
    # the source stream from the next iteration. () = no rounds; tools/active_learning_round.py runs a round between
    # runs instead (the authors' restart-per-round protocol, and labels from people).
    _C.UDA.ACTIVE.ROUND_ITERS = ()
    _C.UDA.ACTIVE.ROUND_IMAGES = ()
    _C.UDA.ACTIVE.STRATEGY = "entropy"
    _C.UDA.ACTIVE.QUOTA_RULE = "largest_remainder"
    _C.UDA.ACTIVE.NETWORK = "teacher"
    # The network input of the selection score (the rounds here and tools/active_learning_round.py): (0, 0) = each
    # image at INPUT.TARGET's base size (1024x2048 for Cityscapes); (h, w) = ILM-ASSL's, the normalised image squashed
    # to (h, w) (769x769) bilinearly with align_corners=True and the head's logits upsampled back to the base size alike
    # (core/active_learning/Semi-sup_active_pu.py:58-70).
    _C.UDA.ACTIVE.SCORE_INPUT_SIZE = (0, 0)

    _C.UDA.STAL = CN()
    # STAL / ILM-ASSL's semi-supervised learner (uda_plugins/methods/stal.py, licongguan/ILM-ASSL train.py and
    # experiments/*/config.yaml): mean teacher (UDA.TEACHER.ALPHA 0.99) on the labelled pool (source + labelled
    # target images, DATASETS.TARGET_LABELED_LIST) and the unlabelled target images. Supervised: OHEM cross-entropy
    # (pixels whose label probability is <= OHEM_THRESH, at least OHEM_MIN_KEPT of them) of the main head plus
    # AUX_WEIGHT x that of an auxiliary head on AUX_FEATURE (U2PL: 0.7, 100000, 0.4, layer3).
    _C.UDA.STAL.OHEM_THRESH = 0.7
    _C.UDA.STAL.OHEM_MIN_KEPT = 100000
    _C.UDA.STAL.AUX_WEIGHT = 0.4
    _C.UDA.STAL.AUX_FEATURE = "res4"
    # Consistency with the teacher's labels, weighted by its confidence ** CONFIDENCE_GAMMA (2) and, with
    # EQUALISATION_SAMPLING, keeping a pixel predicted as c with probability ((1 - cc_c) / max(1 - cc)) **
    # SAMPLING_GAMMA, cc = the running class confidence on labelled pixels (momentum CLASS_MOMENTUM, 0.999).
    _C.UDA.STAL.CONSISTENCY_WEIGHT = 1.0
    _C.UDA.STAL.CONFIDENCE_GAMMA = 2.0
    _C.UDA.STAL.EQUALISATION_SAMPLING = True
    _C.UDA.STAL.SAMPLING_GAMMA = 1.0
    _C.UDA.STAL.CLASS_MOMENTUM = 0.999
    # Adaptive copy-paste on the labelled batch: COPY_PASTE_CLASSES draws (0 = off) among the classes not in
    # ADAPTIVE_CLASSES_IGNORED (the release: road, sidewalk, building, vegetation, sky of the 19 classes).
    _C.UDA.STAL.COPY_PASTE_CLASSES = 3
    _C.UDA.STAL.ADAPTIVE_CLASSES_IGNORED = (0, 1, 2, 8, 10)
    # The probability that a labelled sample gets a paste (the release: 0.5, cityscapes_semi_cp.py:179-192 loads a
    # paste sample only when random.random() > acp.prob, else an all-zero one that leaves the sample as it is).
    _C.UDA.STAL.COPY_PASTE_PROB = 1.0
    # What is pasted (A4): "second_sample", as released (cityscapes_semi_cp.py:179-192): for each labelled sample a
    # second labelled sample drawn uniformly from the labelled pool by a loader stream of its own, at its own random
    # scale PASTE_RATIO_RANGE (acp.rand_resize: 0.1-2.0) with INPUT.SOURCE's crop (which must pad to one size) and
    # flip; or "batch": the next labelled sample of the batch as it is (no extra reads; for inputs not cropped).
    _C.UDA.STAL.PASTE_PARTNER = "second_sample"
    _C.UDA.STAL.PASTE_RATIO_RANGE = (0.1, 2.0)
    # With "second_sample": read a paste sample as the release does (img_loader, cityscapes_semi_cp.py:185-189), at its
    # file's size (not INPUT.SOURCE.RESIZE) and, for GTA5 and SYNTHIA, with its label file as downloaded through PIL's
    # convert("L"): the grey levels of GTA5's palette colours, the high bytes of SYNTHIA's 16-bit labels (almost all
    # 0, no paste), so the query classes pick pixels by those values. False: stretched and mapped like the others.
    _C.UDA.STAL.PASTE_RAW_SOURCE_LABELS = False
    # Adaptive CutMix of the unlabelled images with a partner showing a hard class: a region of that class larger
    # than CUTMIX_AREA_THRESH of the crop (0.005); the bank marks classes covering CUTMIX_BANK_AREA_THRESH (0.01).
    _C.UDA.STAL.CUTMIX = True
    _C.UDA.STAL.CUTMIX_AREA_THRESH = 0.005
    _C.UDA.STAL.CUTMIX_BANK_AREA_THRESH = 0.01
    # The unlabelled pseudo-labels lose UNLABELED_DROP_PERCENT x (1 - progress) % of their pixels by entropy: the
    # most uncertain (U2PL's rule), or the most confident as ILM-ASSL's code does (ENTROPY_FILTER_AS_RELEASED).
    _C.UDA.STAL.UNLABELED_DROP_PERCENT = 20.0
    _C.UDA.STAL.ENTROPY_FILTER_AS_RELEASED = False
    # U2PL's pixel contrastive loss (needs the DeepLabV3PlusHead's representation), weight CONTRASTIVE_WEIGHT (the
    # release: 0.1) from iteration CONTRASTIVE_START_ITER (its epoch 20 of 200): anchors are labelled pixels and the
    # unlabelled pixels below the LOW_ENTROPY_PERCENT-th entropy percentile with their class's probability above
    # ANCHOR_THRESHOLD; negatives, kept in per-class queues of QUEUE_SIZE teacher features (class 0:
    # FIRST_CLASS_QUEUE_SIZE), are pixels above the HIGH_ENTROPY_PERCENT-th percentile not of the class whose
    # teacher ranks it in the top LOW_RANK (labelled) or at LOW_RANK..HIGH_RANK (unlabelled); NUM_QUERIES anchors
    # and NUM_NEGATIVES negatives each, temperature TEMPERATURE (U2PL's paper). CONTRASTIVE_AS_RELEASED samples as
    # ILM-ASSL's code (A2, B7, B8 of uda_plugins/methods/stal.py's deviation table): probabilities resized with
    # align_corners=True, so they and the nearest labels come from different pixels; negatives of class c must be
    # labelled c (none on labelled images); only the first image of the labelled (and of the unlabelled) part has
    # labels, the union of its part's (label_onehot's slot 0); the i-th present class's queue paired with class i's
    # anchors.
    # ILM-ASSL divides its supervised and consistency losses by its number of GPUs before the backward, on top of
    # DDP's gradient averaging (U2PL does not): an effective learning rate / GPUs with weight decay unscaled.
    # LOSS_DIVISOR reproduces that (the release's configs with 4 GPUs: 4.0); 1.0 = U2PL's losses. The contrastive term
    # is divided by LOSS_DIVISOR ** CONTRASTIVE_DIVISOR_POWER: the release all-reduces it (not differentiable) and
    # divides by the GPUs twice (train.py:770-771), power 2; 1 divides it as the other terms.
    _C.UDA.STAL.LOSS_DIVISOR = 1.0
    # The release computes its batch-wide statistics per GPU, over 4 labelled and 1 mixed unlabelled image: OHEM's
    # minimum kept (loss_helper.py:564-593), the consistency's normalisation (Criterion_cons) and the unlabelled
    # filter's entropy percentile (train.py:552). > 0: per group of that many images of a process's batch, the groups'
    # losses averaged as DDP averages the GPUs' gradients (a process standing for several GPUs then trains as
    # released: the paper configs' 4 and 1); 0: over the process's whole batch.
    _C.UDA.STAL.LABELED_GROUP_SIZE = 0
    _C.UDA.STAL.UNLABELED_GROUP_SIZE = 0
    _C.UDA.STAL.CONTRASTIVE_DIVISOR_POWER = 1
    _C.UDA.STAL.CONTRASTIVE_WEIGHT = 0.1
    _C.UDA.STAL.CONTRASTIVE_START_ITER = 0
    _C.UDA.STAL.LOW_ENTROPY_PERCENT = 20.0
    _C.UDA.STAL.HIGH_ENTROPY_PERCENT = 80.0
    _C.UDA.STAL.ANCHOR_THRESHOLD = 0.3
    _C.UDA.STAL.LOW_RANK = 3
    _C.UDA.STAL.HIGH_RANK = 20
    _C.UDA.STAL.NUM_QUERIES = 256
    _C.UDA.STAL.NUM_NEGATIVES = 50
    _C.UDA.STAL.TEMPERATURE = 0.5
    _C.UDA.STAL.CONTRASTIVE_AS_RELEASED = False
    _C.UDA.STAL.QUEUE_SIZE = 30000
    _C.UDA.STAL.FIRST_CLASS_QUEUE_SIZE = 50000

    _C.UDA.DUDA = CN()
    # DUDA (uda_plugins/methods/duda.py, parquets/DUDA trainers/uda_trainer.py). Iterations are counted from the
    # start of self-training: SOURCE_WARMUP_ITERS > 0 trains source-only first in the same run (the authors load a
    # separately trained warm-up model via MODEL.WEIGHTS instead: 0).
    _C.UDA.DUDA.SOURCE_WARMUP_ITERS = 0
    # Online pseudo-labels keep the top ALPHA fraction of each class's teacher confidences in the batch; ALPHA
    # ramps from ALPHA_RANGE[0] to [1] with exponent SCHEDULE_POWER between ALPHA_RAMP_START and the end of
    # training (the authors: 0.2 -> 0.7 from 2000 of 80000, power 1.1).
    _C.UDA.DUDA.ALPHA_RANGE = (0.2, 0.7)
    _C.UDA.DUDA.ALPHA_RAMP_START = 2000
    _C.UDA.DUDA.SCHEDULE_POWER = 1.1
    # The offline bank is rewritten from this iteration on (the authors' hard-coded 10000) ...
    _C.UDA.DUDA.UPDATE_START = 10000
    # ... "batch": the images of each step, from the teacher's predictions of that step (as released);
    # "periodic": the whole bank every REFRESH_PERIOD iterations.
    _C.UDA.DUDA.UPDATE_MODE = "batch"
    _C.UDA.DUDA.REFRESH_PERIOD = 5000
    # Refilled pixels need a confidence in the top BETA fraction of their class (capped at BETA_CAP); BETA ramps
    # from BETA_RANGE[0] to [1] counted from BETA_RAMP_START (the authors' 5000, though updates start at 10000).
    _C.UDA.DUDA.BETA_RANGE = (0.25, 0.75)
    _C.UDA.DUDA.BETA_RAMP_START = 5000
    _C.UDA.DUDA.BETA_CAP = 0.99
    # Loss weights: offline symmetric CE (CE and RCE parts, RCE's log clamp), teacher-student MSE consistency,
    # online CE, and IAST's entropy (on pixels the online label ignores) and KL-to-uniform (on the others)
    # regularisers (the authors' 0.5 x 2 and 0.5 x 0.1).
    _C.UDA.DUDA.OFFLINE_WEIGHT = 1.0
    _C.UDA.DUDA.SCE_CE_WEIGHT = 0.2
    _C.UDA.DUDA.SCE_RCE_WEIGHT = 1.0
    _C.UDA.DUDA.RCE_LOG_CLAMP = 1e-4
    _C.UDA.DUDA.CONSISTENCY_WEIGHT = 1.0
    _C.UDA.DUDA.ONLINE_WEIGHT = 0.5
    _C.UDA.DUDA.ENTROPY_WEIGHT = 1.0
    _C.UDA.DUDA.KLD_WEIGHT = 0.05
    # The same two regularisers around the offline labels (weights 2 and 0.1); commented out in the released
    # code, so off by default.
    _C.UDA.DUDA.OFFLINE_REGULARIZERS = False
    # The student's BatchNorm during self-training: "frozen_affine", as released (the authors' backbone_fix_bn and
    # decoder_fix_bn only stop the affine parameters' gradients and leave them out of SGD: models/backbones/resnet.py
    # :73-83, GeneralSegmentor.py:49-58; the layers stay in train mode and normalise with each forward's batch
    # statistics, source and target apart; SyncBN over the processes in the release: MODEL.BACKBONE.NORM SyncBN),
    # "frozen_statistics" (eval mode: the warm-up's statistics, the affine trained) or "trained".
    _C.UDA.DUDA.BATCH_NORM = "frozen_affine"
    # Resampling as released (trainers/uda_trainer.py:205-218, models/predictors/upsample_predictor.py:17): the
    # teacher's logits are upsampled to the whole image and carried to the crop, then softmaxed, and the student's
    # upsampled to its crop, all bilinear with align_corners=True; False: the teacher's probabilities carried with
    # align_corners=False, mmseg's convention.
    _C.UDA.DUDA.RESAMPLE_AS_RELEASED = True
    # The mean teacher's forwards: "as_released" (trainers/uda_trainer.py:309-332, 641-658): in train mode (batch
    # statistics, dropout) on the crops (the output discarded: its statistics move) and on the whole images (the
    # consistency target), then in eval mode on the whole images (online labels and the bank rewrite); "eval": one
    # eval-mode forward on the whole images for all three.
    _C.UDA.DUDA.TEACHER_FORWARDS = "as_released"
    # The mean teacher's BatchNorm buffers after each update: "student", copied from the student, as torch >= 1.13's
    # AveragedModel does (use_buffers=False; pytorch#84054), which the release runs with on any current torch; or
    # "own": only the teacher's own train-mode forwards and the re-estimation move them (older torch).
    _C.UDA.DUDA.TEACHER_BUFFERS = "student"
    # Before each evaluation, re-estimate the teacher's BatchNorm statistics on this many target training images
    # (whole images; -1 = all, 0 = off), as the authors' mean_update_bn.
    _C.UDA.DUDA.BN_RECALIBRATION_IMAGES = -1

    # ------------------------------------------------------------------ release fidelity
    # One switch for every listed difference of the config's method from its release (uda_plugins/
    # release_fidelity.py): "" = each key as set, "as_released" = the release's values, "fixed" = our fixes. A KEY
    # VALUE on the command line for one of them still wins. Resolved when the config is read (and reset to "").
    _C.UDA.RELEASE_FIDELITY = ""

    # ------------------------------------------------------------------ solver
    # Source images per iteration (global).
    _C.SOLVER.IMS_PER_BATCH_SOURCE = 2
    # Target images per iteration (global), for *each* target domain.
    _C.SOLVER.IMS_PER_BATCH_TARGET = 2
    # "ADAMW" (DAFormer family) or "SGD" (DeepLab family).
    _C.SOLVER.OPTIMIZER = "ADAMW"
    _C.SOLVER.BETAS = (0.9, 0.999)
    # The optimizer's kernels: "auto" (torch's choice: one multi-tensor "foreach" update per step on a GPU, a loop
    # over the parameters on the CPU), "foreach", or "fused" (one kernel for the whole update; CPU and GPU).
    _C.SOLVER.OPTIMIZER_IMPLEMENTATION = "auto"
    # Learning-rate multiplier for parameters whose name contains "head" (mmcv's paramwise rule).
    _C.SOLVER.HEAD_LR_MULTIPLIER = 10.0
    # Release quirk (DAFormer/HRDA/MIC's MiT configs, custom_keys head/pos_block/norm): mmcv gives a parameter the
    # first matching key, longest first then alphabetically, so "head" wins over "norm" and the heads' norm layers
    # are decayed at SOLVER.WEIGHT_DECAY (with the head's learning rate). False (our fix): every norm layer gets
    # SOLVER.WEIGHT_DECAY_NORM, as the configs' norm key intends.
    _C.SOLVER.HEAD_NORMS_DECAYED = False
    # Parameters whose name contains any of these get no weight decay (normalisation layers are handled by
    # Detectron2's SOLVER.WEIGHT_DECAY_NORM, 0 by default).
    _C.SOLVER.NO_WEIGHT_DECAY_KEYWORDS = ("pos_block", "token")
    # "WarmupPolyLR" (mmcv's poly with a multiplicative linear warmup, as DAFormer/MIC) or Detectron2's
    # "WarmupMultiStepLR" / "WarmupCosineLR".
    _C.SOLVER.LR_SCHEDULER_NAME = "WarmupPolyLR"
    _C.SOLVER.POLY_LR_POWER = 1.0
    # The learning rate the poly schedule decays to.
    _C.SOLVER.POLY_LR_END = 0.0
    # Keep at most this many periodic checkpoints (model_final is always kept); 0 keeps all.
    _C.SOLVER.MAX_CHECKPOINTS_TO_KEEP = 2
    # Split each rank's batch into this many micro-batches, forward/backward each, then one optimizer step: K
    # micro-batches on W processes train like K*W processes (batch sizes stay global; they must divide by K*W).
    _C.SOLVER.GRAD_ACCUMULATION_STEPS = 1
    # Mixed precision (Detectron2's SOLVER.AMP.ENABLED): the forward under torch.autocast in this dtype —
    # "bfloat16" (CPU and GPU, no loss scaling) or "float16" (GPU, with a checkpointed GradScaler).
    _C.SOLVER.AMP.PRECISION = "bfloat16"
    # Steps with a non-finite loss that may be skipped (weights untouched) before the run stops; 0 = stop at the
    # first. The count is checkpointed.
    _C.SOLVER.MAX_SKIPPED_NONFINITE_STEPS = 0

    # ------------------------------------------------------------------ test
    # "whole": one forward per image; "slide": overlapping windows of SLIDE_CROP_SIZE with SLIDE_STRIDE.
    _C.TEST.MODE = "whole"
    _C.TEST.SLIDE_CROP_SIZE = (512, 512)
    _C.TEST.SLIDE_STRIDE = (341, 341)
    # Windows per forward in slide mode.
    _C.TEST.SLIDE_BATCH_SIZE = 4
    # Images per rank per forward in whole mode.
    _C.TEST.IMS_PER_BATCH = 1
    # Which network to evaluate: "student" (default: what the papers report), "teacher" or "both"
    # (both are evaluated; results get a student/ teacher/ prefix).
    _C.TEST.EVAL_MODEL = "student"
    # Also keep the checkpoint with the best mIoU on the first test set as model_best_on_test.pth. This is
    # model selection on labelled target data, which unsupervised adaptation does not have: off by default,
    # and labelled as such in the file name.
    _C.TEST.SAVE_BEST_ON_TEST = False
    # The network whose mIoU picks that checkpoint with TEST.EVAL_MODEL both: "" = the first evaluated (the student),
    # or "teacher" (ILM-ASSL's ckpt_best: the teacher's mIoU, train.py:257-277).
    _C.TEST.BEST_ON_TEST_MODEL = ""
    # Evaluate on the centre crop (h, w) of each test image at its INPUT.TEST size, the label resized to that size
    # (nearest) and cropped alike: ILM-ASSL's validation during training, 769x769 centre crops of the 2048x1024 val
    # images (cityscapes.py:65-77, config.yaml's val crop: center). (0, 0) = the whole image.
    _C.TEST.CENTER_CROP = (0, 0)
    # Where predictions are scored: "label" = resized to each label's full resolution (the Cityscapes convention
    # of mmseg and Detectron2); "input" = at the network's input size (INPUT.TEST) against labels resized to it
    # with PIL's NEAREST, MCL's protocol (train.py:148-160, cityscapes_dataset.py:192-193), under which its
    # published numbers were measured. With "input", each test set also reports mIoU_full_resolution.
    _C.TEST.EVAL_RESOLUTION = "label"

    # ------------------------------------------------------------------ reproducibility
    # Deterministic kernels: torch.use_deterministic_algorithms (ops without a deterministic kernel warn), cuDNN
    # deterministic; CUDNN_BENCHMARK must be off. Repeatable GPU runs at a speed cost (README); CPU runs are
    # deterministic without it.
    _C.DETERMINISTIC = False


def get_uda_cfg() -> CN:
    """A fresh Detectron2 config with every uda_plugins key added."""
    cfg = get_cfg()
    add_uda_config(cfg)
    return cfg
