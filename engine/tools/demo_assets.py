"""Deterministic assets for the demo and the benchmarks, built from a seed and cached.

* `build_random_checkpoint`: a VLMo checkpoint with random weights in the published
  Lightning format (key names, shapes, parameter order and training config as the
  published `VLMo` module would save them), loadable with `weights_only=True`.
* `build_synthetic_vqav2`: a small VQAv2 download in the official layout (COCO-named
  JPEGs of coloured shapes and the six official JSON files), ready for the arrow writer.

Both write through engine.atomic (a temporary name renamed at the end), so an existing output is
complete and is reused as is; the output path should therefore name its parameters.
"""
from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import torch
from PIL import Image, ImageDraw

from ..atomic import atomic_directory, write_json, write_torch
from .. import models
from ..models.vlmo.config import ARCH_PRESETS, INIT_TEXT_LEN, PATCH_SIZE, VLMoConfig

PathLike = Union[str, os.PathLike]

TASKS = ("vqa", "nlvr2", "irtr")

# Initial values: (mean, std). Small spread keeps a forward pass numerically sane.
_WEIGHT = (0.0, 0.02)
_NORM_WEIGHT = (1.0, 0.02)
_GAMMA = (0.1, 0.01)
_LOGIT_SCALE = (math.log(1 / 0.07), 0.0)

Layout = List[Tuple[str, Tuple[int, ...], Tuple[float, float]]]


def arch_spec(arch: str = "vlmo_base_patch16", **overrides: Any) -> Dict[str, Any]:
    """A preset's architecture (case.json field names), with fields overridden, e.g. for tiny tests."""
    if arch not in ARCH_PRESETS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCH_PRESETS)}")
    spec = dict(ARCH_PRESETS[arch])
    unknown = sorted(set(overrides) - set(spec))
    if unknown:
        raise ValueError(f"unknown architecture fields: {', '.join(unknown)}")
    spec.update(overrides)
    if spec["embed_dim"] % spec["num_heads"]:
        raise ValueError(f"embed_dim {spec['embed_dim']} is not a multiple of num_heads {spec['num_heads']}")
    if not 0 <= spec["vlffn_start_layer_index"] <= spec["depth"]:
        raise ValueError("vlffn_start_layer_index must lie in [0, depth]")
    return spec


def checkpoint_layout(
    spec: Dict[str, Any],
    image_size: int,
    task: str,
    num_labels: int = 3129,
    vocab_size: int = 30522,
    max_text_len: int = 40,
) -> Layout:
    """(key, shape, init) of every saved tensor, in the order the published module registers them: the engine's
    own list of a VLMo's published tensors (engine.models.checkpoint_layout), plus retrieval's `logit_scale`,
    which the published module registers right after its relative-position table."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if image_size % PATCH_SIZE:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {PATCH_SIZE}")
    cfg = VLMoConfig(**spec, image_size=image_size, max_text_len=max_text_len, vocab_size=vocab_size,
                     max_text_len_of_initckpt=INIT_TEXT_LEN,
                     num_token_types=3 if task == "nlvr2" else 2,  # NLVR2 adds a row for the second image
                     vqa_labels=num_labels if task == "vqa" else None, nlvr2=task == "nlvr2",
                     retrieval=task == "irtr")
    out: Layout = [(key, spec_.shape, _init(key, spec_.shape)) for key, spec_ in models.checkpoint_layout(cfg).items()]
    if task == "irtr":
        out.insert(1 if spec["relative_position_bias"] else 0, ("logit_scale", (), _LOGIT_SCALE))
    return out


def _init(key: str, shape: Tuple[int, ...]) -> Tuple[float, float]:
    if key.rsplit(".", 1)[-1].startswith("gamma_"):
        return _GAMMA
    return _NORM_WEIGHT if len(shape) == 1 and key.endswith(".weight") else _WEIGHT  # 1-D weights: LayerNorms


def build_random_checkpoint(
    path: PathLike,
    arch: str = "vlmo_base_patch16",
    image_size: int = 480,
    task: str = "vqa",
    num_labels: int = 3129,
    seed: int = 0,
    vocab_size: int = 30522,
    max_text_len: int = 40,
    **arch_overrides: Any,
) -> Path:
    """Write a random-weight checkpoint in the published Lightning format (cached: kept if present).

    `arch_overrides` (embed_dim, depth, num_heads, vlffn_start_layer_index,
    relative_position_bias, abs_pos_embed, layer_scale) shrink or reshape the
    preset; the saved `model_arch` then names the custom shape instead of the preset.
    `num_labels` applies to the VQA head only.
    """
    path = Path(path)
    if path.exists():
        return path
    spec = arch_spec(arch, **arch_overrides)
    layout = checkpoint_layout(spec, image_size, task, num_labels, vocab_size, max_text_len)

    gen = torch.Generator().manual_seed(seed)
    state_dict: Dict[str, torch.Tensor] = {}
    for key, shape, (mean, std) in layout:
        tensor = torch.empty(shape, dtype=torch.float32)
        if std:
            tensor.normal_(mean, std, generator=gen)
        else:
            tensor.fill_(mean)
        state_dict[key] = tensor

    model_arch = arch
    if spec != ARCH_PRESETS[arch]:
        model_arch = "vlmo_custom_d{embed_dim}_l{depth}_h{num_heads}_vl{vlffn_start_layer_index}".format(**spec)
    loss_names = {name: 0 for name in ("itm", "itc", "mlm", "textmlm", "vqa", "nlvr2", "irtr")}
    loss_names[task] = 1
    config = {
        "exp_name": f"finetune_{task}_random_weights",
        "seed": seed,
        "datasets": {"vqa": ["vqa"], "nlvr2": ["nlvr2"], "irtr": ["coco"]}[task],
        "loss_names": loss_names,
        "image_size": image_size,
        "max_text_len": max_text_len,
        "max_text_len_of_initckpt": INIT_TEXT_LEN,
        "tokenizer": "bert-base-uncased",
        "vocab_size": vocab_size,
        "vqav2_label_size": num_labels if task == "vqa" else 3129,
        "model_arch": model_arch,
        "drop_path_rate": 0.0,
        "get_recall_metric": task == "irtr",
        "load_path": "",
        "test_only": False,
    }
    checkpoint = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": "1.5.5",
        "state_dict": state_dict,
        "hyper_parameters": {"config": config},
    }
    write_torch(path, checkpoint)
    return path


# ---------------------------------------------------------------- synthetic VQAv2

QUESTION_FILES = {
    "train2014": "v2_OpenEnded_mscoco_train2014_questions.json",
    "val2014": "v2_OpenEnded_mscoco_val2014_questions.json",
    "test2015": "v2_OpenEnded_mscoco_test2015_questions.json",
    "test-dev2015": "v2_OpenEnded_mscoco_test-dev2015_questions.json",
}
ANNOTATION_FILES = {
    "train2014": "v2_mscoco_train2014_annotations.json",
    "val2014": "v2_mscoco_val2014_annotations.json",
}
IMAGE_DIRS = ("train2014", "val2014", "test2015")

# "orange" is drawn rarely so that its questions tend to miss the answer table's >= 9 cut.
_SHAPE_COLOURS = {
    "red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 210),
    "yellow": (230, 200, 40), "orange": (240, 130, 20),
}
_COLOUR_WEIGHTS = {"red": 4, "green": 4, "blue": 4, "yellow": 4, "orange": 1}
_BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
_SHAPES = ("circle", "square", "triangle")
_IMAGE_SIZES = ((640, 480), (480, 640), (500, 375), (640, 427))
_COUNTS = ("1", "2", "3", "4")

Scene = Dict[str, Any]


def image_file_name(split_dir: str, image_id: int) -> str:
    """COCO's file naming, which the published arrow writer parses the image id from."""
    return f"COCO_{split_dir}_{image_id:012d}.jpg"


def build_synthetic_vqav2(
    root: PathLike,
    n_images: int = 6,
    questions_per_image: int = 3,
    seed: int = 0,
    n_train_images: int = 96,
    n_test_images: int = 6,
) -> Path:
    """Write a small VQAv2 download (official layout) of coloured-shape pictures; cached.

    `n_images` is the number of val2014 images (the split the demo scores);
    train2014 is larger so that the common answers pass the >= 9 occurrence cut of
    the answer table. Every other test2015 image also belongs to test-dev2015.
    """
    root = Path(root)
    if _vqav2_complete(root):
        return root
    if root.exists():
        if any(root.iterdir()):
            raise FileExistsError(f"{root} exists but is not a complete synthetic VQAv2 download")
        root.rmdir()
    if not 1 <= questions_per_image <= len(_QUESTION_MAKERS):
        raise ValueError(f"questions_per_image must be in [1, {len(_QUESTION_MAKERS)}]")

    rng = random.Random(seed)
    counts = {"train2014": n_train_images, "val2014": n_images, "test2015": n_test_images}
    ids = rng.sample(range(1, 600_000), sum(counts.values()))
    split_ids: Dict[str, List[int]] = {}
    for split, n in counts.items():
        split_ids[split], ids = sorted(ids[:n]), ids[n:]

    with atomic_directory(root) as tmp:
        questions: Dict[str, List[Dict[str, Any]]] = {}
        annotations: Dict[str, List[Dict[str, Any]]] = {}
        for split, image_ids in split_ids.items():
            (tmp / split).mkdir(parents=True)
            questions[split], annotations[split] = [], []
            for image_id in image_ids:
                scene = _random_scene(rng)
                _draw_scene(scene, rng).save(tmp / split / image_file_name(split, image_id), quality=90)
                makers = rng.sample(_QUESTION_MAKERS, questions_per_image)
                for k, make in enumerate(makers):
                    question_id = image_id * 1000 + k
                    text, answer, question_type, answer_type, pool = make(scene, rng)
                    questions[split].append(
                        {"image_id": image_id, "question": text, "question_id": question_id}
                    )
                    annotations[split].append({
                        "question_id": question_id,
                        "image_id": image_id,
                        "question_type": question_type,
                        "answer_type": answer_type,
                        "multiple_choice_answer": answer,
                        "answers": _annotator_answers(answer, pool, rng),
                    })
        test_dev_images = set(split_ids["test2015"][::2])
        questions["test-dev2015"] = [q for q in questions["test2015"] if q["image_id"] in test_dev_images]

        for subset, name in QUESTION_FILES.items():
            write_json(tmp / name, {
                **_header(subset),
                "task_type": "Open-Ended",
                "questions": questions[subset],
            })
        for subset, name in ANNOTATION_FILES.items():
            write_json(tmp / name, {**_header(subset), "annotations": annotations[subset]})
    return root


def _vqav2_complete(root: Path) -> bool:
    names = list(QUESTION_FILES.values()) + list(ANNOTATION_FILES.values())
    return all((root / n).is_file() for n in names) and all((root / d).is_dir() for d in IMAGE_DIRS)


def _header(subset: str) -> Dict[str, Any]:
    return {
        "info": {
            "description": "Synthetic VQAv2-layout data: coloured shapes on plain backgrounds",
            "version": "2.0",
        },
        "license": {"name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"},
        "data_type": "mscoco",
        "data_subtype": subset,
    }


def _random_scene(rng: random.Random) -> Scene:
    """1-3 shapes of distinct kinds and colours, so every question has one right answer."""
    n = rng.randint(1, 3)
    colours: List[str] = []
    while len(colours) < n:
        c = rng.choices(list(_COLOUR_WEIGHTS), weights=list(_COLOUR_WEIGHTS.values()))[0]
        if c not in colours:
            colours.append(c)
    return {
        "background": rng.choice(list(_BACKGROUNDS)),
        "size": rng.choice(_IMAGE_SIZES),
        "objects": list(zip(rng.sample(_SHAPES, n), colours)),
    }


def _draw_scene(scene: Scene, rng: random.Random) -> Image.Image:
    width, height = scene["size"]
    image = Image.new("RGB", (width, height), _BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(image)
    cell = width / len(scene["objects"])
    for i, (shape, colour) in enumerate(scene["objects"]):
        r = min(cell, height) * rng.uniform(0.25, 0.35)
        cx = cell * (i + 0.5) + rng.uniform(-0.1, 0.1) * cell
        cy = height * rng.uniform(0.4, 0.6)
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = _SHAPE_COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return image


QA = Tuple[str, str, str, str, Tuple[str, ...]]  # question, answer, question_type, answer_type, pool


def _ask_colour(scene: Scene, rng: random.Random) -> QA:
    shape, colour = rng.choice(scene["objects"])
    return f"What color is the {shape}?", colour, "what color is the", "other", tuple(_SHAPE_COLOURS)


def _ask_count(scene: Scene, rng: random.Random) -> QA:
    return "How many shapes are there?", str(len(scene["objects"])), "how many", "number", _COUNTS


def _ask_presence(scene: Scene, rng: random.Random) -> QA:
    shape = rng.choice(_SHAPES)
    present = any(s == shape for s, _ in scene["objects"])
    return f"Is there a {shape} in the picture?", "yes" if present else "no", "is there a", "yes/no", ("yes", "no")


def _ask_shape(scene: Scene, rng: random.Random) -> QA:
    shape, colour = rng.choice(scene["objects"])
    return f"What shape is the {colour} object?", shape, "what", "other", _SHAPES


def _ask_background(scene: Scene, rng: random.Random) -> QA:
    return (
        "What color is the background?", scene["background"], "what color is the", "other",
        tuple(_BACKGROUNDS),
    )


_QUESTION_MAKERS = [_ask_colour, _ask_count, _ask_presence, _ask_shape, _ask_background]


def _annotator_answers(answer: str, pool: Tuple[str, ...], rng: random.Random) -> List[Dict[str, Any]]:
    """Ten annotators: the right answer from at least seven, plausible mistakes from the rest."""
    wrong = [a for a in pool if a != answer]
    given = [answer] * 10
    for i in rng.sample(range(10), rng.choice((0, 0, 1, 1, 2, 3))):
        given[i] = rng.choice(wrong)
    return [
        {"answer": a, "answer_confidence": rng.choice(("yes", "yes", "yes", "maybe")), "answer_id": i + 1}
        for i, a in enumerate(given)
    ]
