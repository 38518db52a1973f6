from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from engine.tools.demo_assets import (
    arch_spec,
    build_random_checkpoint,
    build_synthetic_vqav2,
    checkpoint_layout,
)

TINY = dict(embed_dim=32, depth=3, num_heads=4, vlffn_start_layer_index=2)


def expected_shapes(D, L, H, vl, S, task, labels=3129, V=30522, T=40, relpos=True, abspos=False, gammas=True):
    """The published key set, written out from DESIGN.md §3-§4 (independent of the builder)."""
    F, W = 4 * D, S // 16
    n = W * W + 1
    shapes = {
        "transformer.cls_token": (1, 1, D),
        "transformer.patch_embed.proj.weight": (D, 3, 16, 16),
        "transformer.patch_embed.proj.bias": (D,),
        "transformer.norm.weight": (D,),
        "transformer.norm.bias": (D,),
        "text_embeddings.word_embeddings.weight": (V, D),
        "text_embeddings.position_embeddings.weight": (T, D),
        "text_embeddings.token_type_embeddings.weight": (2, D),
        "text_embeddings.LayerNorm.weight": (D,),
        "text_embeddings.LayerNorm.bias": (D,),
        "token_type_embeddings.weight": (3 if task == "nlvr2" else 2, D),
        "pooler.dense.weight": (D, D),
        "pooler.dense.bias": (D,),
    }
    if relpos:
        shapes["relative_position_bias_table"] = ((2 * W - 1) ** 2 + 3 + 2 * 196 + 2, L * H)
    if abspos:
        shapes["transformer.pos_embed"] = (1, n, D)
    for i in range(L):
        b = f"transformer.blocks.{i}."
        shapes.update({
            b + "norm1.weight": (D,), b + "norm1.bias": (D,),
            b + "attn.qkv.weight": (3 * D, D),
            b + "attn.q_bias": (D,), b + "attn.v_bias": (D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
        })
        if gammas:
            shapes[b + "gamma_1"] = (D,)
            shapes[b + "gamma_2"] = (D,)
        for e in ["text", "imag"] + (["vl"] if i >= vl else []):
            shapes.update({
                b + f"norm2_{e}.weight": (D,), b + f"norm2_{e}.bias": (D,),
                b + f"mlp_{e}.fc1.weight": (F, D), b + f"mlp_{e}.fc1.bias": (F,),
                b + f"mlp_{e}.fc2.weight": (D, F), b + f"mlp_{e}.fc2.bias": (D,),
            })
    if task == "vqa":
        shapes.update({
            "vqa_classifier.0.weight": (2 * D, D), "vqa_classifier.0.bias": (2 * D,),
            "vqa_classifier.1.weight": (2 * D,), "vqa_classifier.1.bias": (2 * D,),
            "vqa_classifier.3.weight": (labels, 2 * D), "vqa_classifier.3.bias": (labels,),
        })
    elif task == "nlvr2":
        shapes.update({
            "nlvr2_classifier.0.weight": (2 * D, 2 * D), "nlvr2_classifier.0.bias": (2 * D,),
            "nlvr2_classifier.1.weight": (2 * D,), "nlvr2_classifier.1.bias": (2 * D,),
            "nlvr2_classifier.3.weight": (2, 2 * D), "nlvr2_classifier.3.bias": (2,),
        })
    else:
        shapes["itc_text_proj.fc.weight"] = (D, D)
        shapes["itc_image_proj.fc.weight"] = (D, D)
        shapes["logit_scale"] = ()  # the published irtr head also registers it
    return shapes


def load(path):
    # Plain tensors and builtins only: must load without any allow-listed classes.
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "irtr"])
def test_tiny_relpos_checkpoint_has_published_keys(tmp_path, task):
    path = build_random_checkpoint(
        tmp_path / f"tiny_{task}.pt", image_size=32, task=task, num_labels=9, vocab_size=100, **TINY
    )
    ckpt = load(path)
    assert set(ckpt) == {"epoch", "global_step", "pytorch-lightning_version", "state_dict", "hyper_parameters"}
    got = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
    assert got == expected_shapes(32, 3, 4, 2, 32, task, labels=9, V=100)
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values())

    config = ckpt["hyper_parameters"]["config"]
    assert config["image_size"] == 32 and config["max_text_len"] == 40 and config["vocab_size"] == 100
    assert {k for k, v in config["loss_names"].items() if v > 0} == {task}
    assert config["model_arch"] not in ("vlmo_base_patch16", "vlmo_base_plus_patch16", "vlmo_large_patch16")
    if task == "vqa":
        assert config["vqav2_label_size"] == 9


def test_tiny_abspos_checkpoint_like_base_plus(tmp_path):
    path = build_random_checkpoint(
        tmp_path / "abs.pt", arch="vlmo_base_plus_patch16", image_size=48, vocab_size=50, **TINY
    )
    got = {k: tuple(v.shape) for k, v in load(path)["state_dict"].items()}
    assert got == expected_shapes(32, 3, 4, 2, 48, "vqa", V=50, relpos=False, abspos=True, gammas=False)


@pytest.mark.parametrize(
    "arch, D, L, H, vl, relpos",
    [
        ("vlmo_base_patch16", 768, 12, 12, 10, True),
        ("vlmo_base_plus_patch16", 544, 24, 16, 21, False),
        ("vlmo_large_patch16", 1024, 24, 16, 21, True),
    ],
)
def test_preset_layouts_match_published_shapes(arch, D, L, H, vl, relpos):
    layout = checkpoint_layout(arch_spec(arch), 480, "vqa")
    got = {key: shape for key, shape, _ in layout}
    assert len(got) == len(layout)
    assert got == expected_shapes(D, L, H, vl, 480, "vqa", relpos=relpos, abspos=not relpos, gammas=relpos)
    if relpos:
        assert got["relative_position_bias_table"] == (3878, L * H)  # W = 30


def test_checkpoint_values_are_sane_deterministic_and_cached(tmp_path):
    kw = dict(image_size=32, vocab_size=100, **TINY)
    a = build_random_checkpoint(tmp_path / "a.pt", seed=3, **kw)
    b = build_random_checkpoint(tmp_path / "b.pt", seed=3, **kw)
    c = build_random_checkpoint(tmp_path / "c.pt", seed=4, **kw)
    sa, sb, sc = (load(p)["state_dict"] for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["pooler.dense.weight"], sc["pooler.dense.weight"])
    assert abs(sa["transformer.blocks.0.norm1.weight"].mean().item() - 1.0) < 0.05
    assert abs(sa["transformer.blocks.0.gamma_1"].mean().item() - 0.1) < 0.05
    assert sa["transformer.blocks.0.attn.qkv.weight"].std().item() == pytest.approx(0.02, rel=0.2)

    stamp = a.stat().st_mtime_ns
    assert build_random_checkpoint(a, seed=99, **kw) == a
    assert a.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_checkpoint_arguments(tmp_path):
    with pytest.raises(ValueError):
        build_random_checkpoint(tmp_path / "x.pt", arch="vit_base")
    with pytest.raises(ValueError):
        build_random_checkpoint(tmp_path / "x.pt", image_size=40, **TINY)
    with pytest.raises(ValueError):
        build_random_checkpoint(tmp_path / "x.pt", task="captioning", **TINY)
    with pytest.raises(ValueError):
        build_random_checkpoint(tmp_path / "x.pt", embed_dim=30, num_heads=4)
    assert list(tmp_path.iterdir()) == []


QUESTION_FILES = {
    "v2_OpenEnded_mscoco_train2014_questions.json": "train2014",
    "v2_OpenEnded_mscoco_val2014_questions.json": "val2014",
    "v2_OpenEnded_mscoco_test2015_questions.json": "test2015",
    "v2_OpenEnded_mscoco_test-dev2015_questions.json": "test2015",
}
ANNOTATION_FILES = {
    "v2_mscoco_train2014_annotations.json": "v2_OpenEnded_mscoco_train2014_questions.json",
    "v2_mscoco_val2014_annotations.json": "v2_OpenEnded_mscoco_val2014_questions.json",
}


def read(root: Path, name: str):
    return json.loads((root / name).read_text())


def test_synthetic_vqav2_layout(tmp_path):
    root = build_synthetic_vqav2(tmp_path / "vqav2", seed=1)
    assert {p.name for p in root.iterdir()} == set(QUESTION_FILES) | set(ANNOTATION_FILES) | {
        "train2014", "val2014", "test2015"
    }
    n_questions = {}
    for name, image_dir in QUESTION_FILES.items():
        questions = read(root, name)["questions"]
        n_questions[name] = len(questions)
        assert len({q["question_id"] for q in questions}) == len(questions)
        for q in questions:
            assert set(q) == {"image_id", "question", "question_id"}
            assert q["question"].endswith("?")
            image = root / image_dir / f"COCO_{image_dir}_{q['image_id']:012d}.jpg"
            with Image.open(image) as im:
                im.convert("RGB").load()
                assert im.format == "JPEG"
    assert 16 <= n_questions["v2_OpenEnded_mscoco_val2014_questions.json"] <= 24

    test_ids = {q["question_id"] for q in read(root, "v2_OpenEnded_mscoco_test2015_questions.json")["questions"]}
    dev_ids = {q["question_id"] for q in read(root, "v2_OpenEnded_mscoco_test-dev2015_questions.json")["questions"]}
    assert dev_ids and dev_ids < test_ids

    majority = Counter()
    for name, question_file in ANNOTATION_FILES.items():
        annotations = read(root, name)["annotations"]
        questions = read(root, question_file)["questions"]
        assert [(a["question_id"], a["image_id"]) for a in annotations] == [
            (q["question_id"], q["image_id"]) for q in questions
        ]
        for a in annotations:
            answers = [x["answer"] for x in a["answers"]]
            assert len(answers) == 10 and [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            assert Counter(answers).most_common(1)[0][0] == a["multiple_choice_answer"]
            assert a["answer_type"] in ("yes/no", "number", "other")
            majority[a["multiple_choice_answer"]] += 1
    # The arrow writer keeps answers given as the majority answer >= 9 times (train + val).
    assert sum(n >= 9 for n in majority.values()) >= 5
    # Answers are already in normalised form (lower case, digits, no articles).
    assert all(a == a.lower() and a.split()[0] not in ("a", "an", "the") for a in majority)


def test_synthetic_vqav2_is_deterministic_and_cached(tmp_path):
    a = build_synthetic_vqav2(tmp_path / "a", n_images=3, n_train_images=10, n_test_images=2, seed=5)
    b = build_synthetic_vqav2(tmp_path / "b", n_images=3, n_train_images=10, n_test_images=2, seed=5)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)

    stamp = (a / "v2_mscoco_val2014_annotations.json").stat().st_mtime_ns
    assert build_synthetic_vqav2(a, seed=6) == a
    assert (a / "v2_mscoco_val2014_annotations.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a dataset")
    with pytest.raises(FileExistsError):
        build_synthetic_vqav2(foreign)


@pytest.mark.parametrize("case", ["tiny_relpos_nlvr2", "tiny_relpos_irtr", "tiny_abspos_vqa"])
def test_matches_a_checkpoint_saved_by_the_published_code(tmp_path, case):
    """Same keys, shapes, key order and config fields as the golden checkpoints."""
    folder = Path("/work/shared/golden") / case
    if not folder.exists():
        pytest.skip("golden checkpoints not available")
    spec = json.loads((folder / "case.json").read_text())
    golden = load(folder / "checkpoint.pt")
    arch = "vlmo_base_patch16" if spec["relative_position_bias"] else "vlmo_base_plus_patch16"
    fields = ("embed_dim", "depth", "num_heads", "vlffn_start_layer_index",
              "relative_position_bias", "abs_pos_embed", "layer_scale")
    ours = load(build_random_checkpoint(
        tmp_path / "ours.pt", arch=arch, image_size=spec["image_size"], task=spec["task"],
        **{f: spec[f] for f in fields},
    ))
    assert list(ours) == list(golden)
    assert [(k, v.shape) for k, v in ours["state_dict"].items()] == [
        (k, v.shape) for k, v in golden["state_dict"].items()
    ]
    assert set(golden["hyper_parameters"]["config"]) <= set(ours["hyper_parameters"]["config"])
