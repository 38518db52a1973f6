"""Read a published VLMo checkpoint without ever running code from its pickle.

The pickle is read by an allow-list unpickler: the only globals it will resolve
are torch's tensor-rebuilding functions, dtypes and ``OrderedDict`` (the set
``torch.load(weights_only=True)`` trusts), plus the data containers training
frameworks leave behind (Lightning's ``AttributeDict``, sacred's read-only
containers), which are rebuilt as inert dict/list stand-ins of ours; the real
classes are never imported. torch's own weights_only unpickler cannot rebuild
dict subclasses, hence our own. Every other global is refused, and a pre-scan
of the opcodes names them before anything is unpickled.
"""
from __future__ import annotations

import codecs
import collections
import pickle
import pickletools
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Set

import torch

from engine.runtime.errors import ShardingError
from engine.runtime.shards import non_finite, sha256_file

# Non-torch globals that real checkpoints carry as pure data containers.
INERT_CONTAINERS: Dict[str, type] = {
    "pytorch_lightning.utilities.parsing.AttributeDict": dict,
    "lightning.pytorch.utilities.parsing.AttributeDict": dict,
    "lightning_fabric.utilities.data.AttributeDict": dict,
    "lightning.fabric.utilities.data.AttributeDict": dict,
    "sacred.config.custom_containers.ReadOnlyDict": dict,
    "sacred.config.custom_containers.ReadOnlyList": list,
}
_TENSOR_GLOBALS: Dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch.Size": torch.Size,
    "_codecs.encode": codecs.encode,  # how protocol-2 pickles spell bytes
}
# Where published checkpoints keep the weights, in the published lookup order.
STATE_DICT_KEYS = ("state_dict", "module", "model")


@dataclass
class Checkpoint:
    state_dict: Dict[str, torch.Tensor]
    hyper_parameters: Dict[str, Any]
    sha256: str


def _pickle_globals(data: bytes) -> Set[str]:
    """Names of the globals a pickle references, found by reading opcodes only."""
    found: Set[str] = set()
    recent_strings: List[str] = []
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ("GLOBAL", "INST"):
            found.add(str(arg).replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL" and len(recent_strings) >= 2:
            found.add(f"{recent_strings[-2]}.{recent_strings[-1]}")
        elif isinstance(arg, str):
            recent_strings.append(arg)
    return found


def _referenced_globals(path: Path) -> Set[str]:
    if not zipfile.is_zipfile(path):
        return set()  # legacy format: torch's weights_only unpickler judges it alone
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise ShardingError(path, "not a PyTorch checkpoint (no data.pkl in the archive)")
        data = archive.read(pickles[0])
    try:
        return _pickle_globals(data)
    except Exception as exc:  # pickletools raises bare ValueErrors on garbage
        raise ShardingError(path, f"the checkpoint's pickle is malformed ({exc})") from None


def _inert_class(qualified_name: str, base: type) -> type:
    module, _, name = qualified_name.rpartition(".")
    return type(name, (base,), {"__module__": module, "__qualname__": name})


def _resolve(name: str) -> Any:
    """The object an allowed global name stands for, or None when it is not allowed."""
    if name in _TENSOR_GLOBALS:
        return _TENSOR_GLOBALS[name]
    if name in INERT_CONTAINERS:
        return _inert_class(name, INERT_CONTAINERS[name])
    module, _, attr = name.rpartition(".")
    if module == "torch" and isinstance(getattr(torch, attr, None), torch.dtype):
        return getattr(torch, attr)
    return None


class _RefusedGlobal(pickle.UnpicklingError):
    """Our refusal of a global, told apart from the errors of a file that is no pickle at all."""


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _resolve(f"{module}.{name}")
        if found is None:
            raise _RefusedGlobal(f"the pickle references {module}.{name}, which is not checkpoint data")
        return found


# torch.load takes a "pickle module"; ours only differs in its Unpickler.
_allow_list_pickle = types.SimpleNamespace(Unpickler=_AllowListUnpickler, load=pickle.load, __name__="allow_list_pickle")


def _refuse_unknown_globals(path: Path, names: Iterable[str]) -> None:
    # Storage classes are resolved by torch itself, before our unpickler is asked.
    refused = sorted(n for n in names if _resolve(n) is None and not n.endswith("Storage"))
    if refused:
        raise ShardingError(
            path,
            f"refusing to load: its pickle references {', '.join(refused)}, which is not plain "
            "checkpoint data (nothing from the file was run)",
        )


def _check_member_crcs(path: Path) -> None:
    """Refuse a zip checkpoint whose bytes changed after writing: torch.load never checks the CRC-32s."""
    if not zipfile.is_zipfile(path):
        return  # the legacy format carries no checksums
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every member through and compares its CRC-32
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ShardingError(path, f"not a readable PyTorch checkpoint (truncated or corrupt?): {_first_line(exc)}") \
            from None
    if bad is not None:
        raise ShardingError(path, f"archive member {bad} fails its CRC-32 check: the file is corrupt "
                                  "(damaged in transfer or on disk); fetch it again")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _torch_load(path: Path) -> Any:
    mmap = zipfile.is_zipfile(path)  # mmap keeps multi-GB checkpoints out of RAM
    return torch.load(path, map_location="cpu", pickle_module=_allow_list_pickle, weights_only=False, mmap=mmap)


def _plain(value: Any) -> Any:
    """Turn stand-in containers back into plain dicts and lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _find_state_dict(path: Path, obj: Any) -> Dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise ShardingError(path, f"expected a checkpoint dict, found a {type(obj).__name__}")
    for key in STATE_DICT_KEYS:
        if key in obj and isinstance(obj[key], dict):
            found = obj[key]
            if key == "module":  # DeepSpeed
                found = {k[len("module."):] if k.startswith("module.") else k: v for k, v in found.items()}
            break
    else:
        found = obj
    weights = {k: v for k, v in found.items() if isinstance(v, torch.Tensor)}
    if not weights:
        raise ShardingError(path, "no weights found (looked under 'state_dict', 'module', 'model' and the top level)")
    return weights


def _check_is_file(path: Path) -> None:
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".pt", ".pth", ".ckpt", ".bin"))
        hint = f" (it holds {', '.join(inside[:3])}{', ...' if len(inside) > 3 else ''})" if inside else ""
        raise ShardingError(path, f"is a directory, not a checkpoint file; pass the checkpoint file itself{hint}")
    if not path.exists():
        raise ShardingError(path, "no such checkpoint file")
    if not path.is_file():
        raise ShardingError(path, "is not a regular file; pass the checkpoint file itself")
    if path.stat().st_size == 0:
        raise ShardingError(path, "the checkpoint file is empty")


def refuse_non_finite(path: Path, weights: Mapping[str, torch.Tensor]) -> None:
    """Refuse weights holding NaN or infinity: the engine would turn every answer into NaN logits."""
    problems = {name: non_finite(tensor) for name, tensor in weights.items()}
    bad = [name for name, problem in problems.items() if problem]
    if bad:
        more = f" (and {len(bad) - 1} more: {', '.join(bad[1:4])}{', ...' if len(bad) > 4 else ''})" if bad[1:] else ""
        raise ShardingError(path, f"{bad[0]} {problems[bad[0]]}{more}; non-finite weights give non-finite outputs, "
                                  "refusing to shard them")


def read_checkpoint(path: Path) -> Checkpoint:
    """Read weights and training hyper-parameters from a published checkpoint file."""
    path = Path(path)
    _check_is_file(path)
    _check_member_crcs(path)
    _refuse_unknown_globals(path, _referenced_globals(path))
    try:
        obj = _torch_load(path)
    except _RefusedGlobal as exc:
        raise ShardingError(path, f"refusing to load: {_first_line(exc)}") from None
    except pickle.UnpicklingError as exc:
        raise ShardingError(path, f"not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle: "
                                  f"{_first_line(exc)})") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise ShardingError(path, f"not a readable PyTorch checkpoint (truncated or corrupt?): {_first_line(exc)}") \
            from None
    state_dict = _find_state_dict(path, obj)
    hyper = _plain(obj.get("hyper_parameters", {})) if isinstance(obj, dict) else {}
    if isinstance(hyper, dict) and isinstance(hyper.get("config"), dict):
        hyper = hyper["config"]
    return Checkpoint(state_dict=state_dict, hyper_parameters=hyper if isinstance(hyper, dict) else {},
                      sha256=sha256_file(path))
