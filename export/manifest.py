"""The bundle's ``manifest.json``: what ``mssan_infer.bundle.load_bundle`` and the runtime read."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any, Mapping, Tuple

import onnx
import onnxruntime
import torch

from mssan_infer.files import sha256_file
from mssan_infer.names import FORMAT_VERSION, MANIFEST_FILE, VOCAB_FILE
from mssan_infer.spec import GRAPHS, QUERY_SCORERS
from mssan_infer.text import subword
from mssan_infer.text import words as word_tokenizer
from training.config import ModelConfig

__all__ = [
    "EXPORTER_VERSION",
    "FP16_DIR",
    "INT8_DIR",
    "hash_files",
    "FileKey",
    "file_key",
    "build_manifest",
    "write_manifest",
    "tokenizer_entry",
    "bundle_tokenizer_file",
]

EXPORTER_VERSION = "0.1.0"
FP16_DIR = "fp16"
INT8_DIR = "int8"


def bundle_tokenizer_file(cfg: ModelConfig) -> str:
    """The bundle's tokenizer file: ``tokenizer.json`` (transformer tower) or ``vocab.json`` (Bi-GRU)."""
    return subword.FILE if cfg.text_encoder == "transformer" else VOCAB_FILE


def tokenizer_entry(root: Path, cfg: ModelConfig) -> dict[str, Any]:
    """The manifest's ``tokenizer``: its kind, file, sha256 and everything a tokenizer of another
    implementation (the Triton ``retriever`` model) needs to give the same ids."""
    if cfg.text_encoder == "transformer":
        import tokenizers

        path = root / subword.FILE
        tok = subword.SubwordTokenizer.from_file(path, max_len=cfg.max_len)
        return {
            "kind": subword.KIND,
            "file": subword.FILE,
            "sha256": sha256_file(path),
            "library": f"tokenizers {tokenizers.__version__}",
            "encode": "Tokenizer.from_file(file).encode(text, add_special_tokens=False).ids",
            "max_len": cfg.max_len,
            "truncation": "the first max_len subwords (a word may be cut between its pieces)",
            "padding": "0 after the last subword; token_mask 1 for real subwords",
            "special_tokens_in_graph": "the text encoder adds prefix_ids before and suffix_ids after the "
            "subwords; they are context for the transformer, not word locals",
            "prefix_ids": list(cfg.text_prefix_ids),
            "suffix_ids": list(cfg.text_suffix_ids),
            "unk_id": tok.unk_id,
            "vocab_size": len(tok),
        }
    return {
        "vocab": VOCAB_FILE,
        "sha256": sha256_file(root / VOCAB_FILE),
        **word_tokenizer.settings(cfg.max_len),
    }


FileKey = Tuple[int, int, int, int]  # a file's device, inode, size and mtime (ns): the same file, unchanged


def file_key(path: Path) -> FileKey:
    """The identity of the file at ``path`` as it is now (:data:`FileKey`)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def hash_files(root: Path, known: Mapping[FileKey, str] | None = None) -> dict[str, str]:
    """{relative posix path: sha256} of every file under ``root`` except the manifest.

    ``known``: sha256 of files already verified, by :func:`file_key` (a hard link to one of them, unchanged
    since, is not read again).
    """
    files: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST_FILE:
            digest = known.get(file_key(p)) if known else None
            files[p.relative_to(root).as_posix()] = digest or sha256_file(p)
    return files


def build_manifest(
    root: Path,
    cfg: ModelConfig,
    *,
    opset: int,
    fp16: bool,
    parity: dict[str, Any],
    verified: bool,
    checkpoint: Path,
    checkpoint_sha256: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of the bundle being built in ``root`` (all other files already written)."""
    d = cfg.embed_size
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "graphs": {name: spec.to_dict() for name, spec in {**GRAPHS, **QUERY_SCORERS}.items()},
    }
    if fp16:
        manifest["fp16_graphs"] = {
            name: {
                **spec.to_dict(),
                "file": f"{FP16_DIR}/{spec.file}",
                "precision": "fp16",
                "note": "MatMul/Gemm in fp16; softmax, norms, reductions and the GRU in fp32; float32 I/O",
            }
            for name, spec in GRAPHS.items()
        }
    manifest.update(
        {
            "files": hash_files(root),
            "model_config": cfg.to_dict(),
            "tokenizer": tokenizer_entry(root, cfg),
            "scoring": {
                "final": "img_stage1 . txt_stage1 + s_ll",
                "lam_gg": cfg.lam_gg,
                "lam_gl": cfg.lam_gl,
                "lam_ll": cfg.lam_ll,
            },
            "dims": {"D": d, "D2": 2 * d, "Dv": cfg.img_dim},
            "preprocessing": {"input": "regions", "feature_dim": cfg.img_dim},
            "parity": parity,
            "verified": verified,
            "versions": {
                "mssan_export": EXPORTER_VERSION,
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
                "opset": opset,
                "python": platform.python_version(),
            },
            "source_checkpoint": {"path": str(checkpoint), "sha256": checkpoint_sha256},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
    )
    if extra:
        manifest.update(extra)
    return manifest


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    path = root / MANIFEST_FILE
    tmp = path.with_name(f".{MANIFEST_FILE}.tmp")
    tmp.unlink(missing_ok=True)  # a new file: never written through a hard link into another bundle
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
    return path
