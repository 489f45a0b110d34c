"""Read and verify an export bundle: manifest, format version, sha256 of every file, path confinement."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .core.files import safe_member, sha256_file
from .core.store import read_index_manifest
from .core.subword import TextTokenizer, load_text_tokenizer
from .errors import BundleError, IndexFileError
from .spec import FORMAT_VERSION, GRAPHS, MANIFEST_FILE, VOCAB_FILE

__all__ = ["Bundle", "load_bundle", "safe_member", "PRECISIONS", "check_index_bundle", "tokenizer_from_bundle"]

PRECISIONS = ("fp32", "fp16", "int8")     # graph sets a bundle may hold: graphs, fp16_graphs, int8_graphs


@dataclass
class Bundle:
    """A verified bundle folder and its manifest."""

    root: Path
    manifest: dict[str, Any]

    def path(self, name: str) -> Path:
        return safe_member(self.root, name)

    def graph_path(self, graph: str, precision: str = "fp32") -> Path:
        """Path of ``graph`` ("image_encoder", "text_encoder", "scorer") at ``precision``
        ("fp32", "fp16", or "int8": the int8 text encoder beside the fp32 image encoder and scorer)."""
        table = self.manifest["graphs"] if precision == "fp32" else self.manifest.get(f"{precision}_graphs") or {}
        if graph not in table:
            have = ", ".join(p for p in PRECISIONS if p == "fp32" or self.manifest.get(f"{p}_graphs"))
            raise BundleError(
                f"bundle {self.root} has no {precision} graph {graph!r} (it has {have}); "
                f"re-export with `python -m export{'' if precision == 'fp32' else ' --' + precision}`"
            )
        return self.path(table[graph]["file"])

    @property
    def model_config(self) -> dict[str, Any]:
        return dict(self.manifest["model_config"])

    @property
    def id_files(self) -> dict[str, str]:
        """The files the bundle id covers, with their sha256: the three fp32 graphs and the vocabulary.

        That is everything an index's vectors are made from and scored with. Optional extras (``--fp16``
        graphs, the ``--pixels`` graph, TensorRT engines, the Triton repository) do not change it, so
        re-exporting a checkpoint with other extras keeps the id and the indexes built with it.
        """
        files = self.manifest["files"]
        graphs = self.manifest.get("graphs") or {g: {"file": spec.file} for g, spec in GRAPHS.items()}
        names = {str(e["file"]) for e in graphs.values()}
        tk = self.manifest.get("tokenizer") or {}
        names.add(str(tk.get("file") or tk.get("vocab", VOCAB_FILE)))
        return {k: files[k] for k in sorted(names) if k in files}

    @property
    def bundle_id(self) -> str:
        """Identifies the bundle's weights: the sha256 of its fp32 graphs and vocabulary, combined (:attr:`id_files`)."""
        return hashlib.sha256("".join(f"{k}={v};" for k, v in self.id_files.items()).encode()).hexdigest()[:16]


def load_bundle(root: str | os.PathLike[str], verify: bool = True) -> Bundle:
    """Open a bundle folder, check its format version and (by default) every file's sha256.

    Raises:
        BundleError: missing folder/manifest, unknown format, a file that is missing,
            truncated or tampered, or a path that leaves the bundle.
    """
    rootp = Path(root)
    if not rootp.is_dir():
        raise BundleError(f"bundle folder {rootp} does not exist; create one with `python -m export --checkpoint CKPT --out {rootp}`")
    mpath = rootp / MANIFEST_FILE
    if not mpath.is_file():
        raise BundleError(f"{rootp} has no {MANIFEST_FILE}: not a bundle, or the export did not finish. Re-export it.")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"{mpath} is not valid JSON ({e}); the bundle is damaged. Re-export it.") from e
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath} is not a JSON object; re-export the bundle")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise BundleError(f"{mpath} has no integer format_version; re-export the bundle")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"bundle format {version} is newer than this mssan_infer understands ({FORMAT_VERSION}); upgrade mssan_infer"
        )
    if version < FORMAT_VERSION:
        raise BundleError(f"bundle format {version} is older than supported ({FORMAT_VERSION}); re-export it")
    for key in ("graphs", "files", "model_config", "tokenizer"):
        if key not in manifest:
            raise BundleError(f"{mpath} lacks {key!r}; re-export the bundle")
    for key in ("graphs", "model_config", "tokenizer"):
        if not isinstance(manifest[key], dict):
            raise BundleError(f"{mpath}: {key!r} must be a JSON object, got {type(manifest[key]).__name__}; re-export the bundle")
    for table in ("graphs", *(f"{p}_graphs" for p in PRECISIONS[1:])):
        for gname, entry in (manifest.get(table) or {}).items():
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                raise BundleError(f"{mpath}: {table} entry {gname!r} names no file; re-export the bundle")
    for key in ("embed_size", "img_dim"):
        value = manifest["model_config"].get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BundleError(f"{mpath}: model_config.{key} must be a positive int, got {value!r}; re-export the bundle")
    missing = set(GRAPHS) - set(manifest["graphs"])
    if missing:
        raise BundleError(f"manifest lacks graphs {sorted(missing)}; re-export the bundle")
    files = manifest["files"]
    if not isinstance(files, dict):
        raise BundleError(f"{mpath}: 'files' must map names to sha256; re-export the bundle")
    listed = [e["file"] for e in manifest["graphs"].values()]
    for p in PRECISIONS[1:]:
        listed += [e["file"] for e in (manifest.get(f"{p}_graphs") or {}).values()]
    listed.append(manifest["tokenizer"].get("file") or manifest["tokenizer"].get("vocab", "vocab.json"))
    unhashed = [n for n in listed if n not in files]
    if unhashed:
        raise BundleError(f"manifest lists {unhashed} without a sha256; the bundle cannot be verified. Re-export it.")
    for name, digest in files.items():
        path = safe_member(rootp, name)
        if not path.is_file():
            raise BundleError(f"bundle file {name} is missing from {rootp}; copy the whole bundle folder or re-export")
        if verify and sha256_file(path) != digest:
            raise BundleError(
                f"bundle file {name} does not match its sha256 in the manifest (truncated or modified); "
                "copy it again from the original export or re-export"
            )
    return Bundle(rootp, manifest)


BUNDLE_FILES = "bundle_files"      # index manifest: the files (and sha256) the bundle id was made of


def check_index_bundle(index: str | os.PathLike[str], bundle: Bundle) -> None:
    """Refuse an index built with another bundle, naming the files that differ (when the index recorded them).

    Raises:
        IndexFileError: the ids differ (or the index is unreadable).
    """
    try:
        manifest = read_index_manifest(index)
    except IndexFileError:
        return                          # load_index reports it (after putting back an interrupted save)
    if manifest["bundle_id"] == bundle.bundle_id:
        return
    old = manifest.get(BUNDLE_FILES)
    if isinstance(old, dict):
        new = bundle.id_files
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        what = f"these files differ: {', '.join(changed)}" if changed else "the bundle id is computed differently"
    else:
        what = ("the index does not record which files it was built with (indexes written before bundle ids "
                "ignored --fp16 and --pixels)")
    raise IndexFileError(
        f"index {index} was built with bundle {manifest['bundle_id']}, but the loaded bundle is {bundle.bundle_id} "
        f"({what}); its vectors would not match. Rebuild the index with this bundle "
        "(`python -m mssan_infer index --bundle ... --overwrite`)."
    )


def tokenizer_from_bundle(bundle: Bundle) -> TextTokenizer:
    """The bundle's tokenizer with the manifest's ``max_len``: the word ``Tokenizer`` on ``vocab.json``
    (Bi-GRU tower), or the ``SubwordTokenizer`` on ``tokenizer.json`` (transformer tower).

    Raises:
        BundleError: the bundle was exported with a different tokenizer definition, or its
            tokenizer file does not match the sha256 the manifest records for it.
        BackendUnavailableError: a subword tokenizer without the ``tokenizers`` package.
    """
    tk = dict(bundle.manifest.get("tokenizer") or {})
    tk.setdefault("max_len", bundle.model_config.get("max_len", 64))
    return load_text_tokenizer(tk, bundle.path, f"bundle {bundle.root}")
