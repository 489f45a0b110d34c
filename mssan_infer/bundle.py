"""Read and verify an export bundle: manifest, format version, sha256 of every file, path confinement.

The manifest is parsed once, by :func:`load_bundle`, into a :class:`Manifest` that the rest of the
runtime reads.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from mssan_infer.errors import BundleError, IndexFileError
from mssan_infer.files import read_versioned_json, recover_swap, safe_member, sha256_file
from mssan_infer.gallery.folder import read_index_manifest
from mssan_infer.names import FORMAT_VERSION, MANIFEST_FILE, VOCAB_FILE
from mssan_infer.spec import GRAPHS, PRECISIONS
from mssan_infer.text.base import TextTokenizer, load_text_tokenizer

__all__ = [
    "Bundle",
    "Manifest",
    "load_bundle",
    "id_files",
    "bundle_id",
    "check_index_bundle",
    "tokenizer_from_bundle",
    "BUNDLE_FILES",
]


@dataclass(frozen=True)
class Manifest:
    """A bundle's ``manifest.json``, checked and typed.

    Attributes:
        format_version: the bundle format.
        files: bundle-relative file -> sha256 (every file the bundle holds).
        graphs: precision (``"fp32"``, ``"fp16"``, ``"int8"``) -> graph name -> file; ``"fp32"`` holds all
        three.
        optional_graphs: extra graphs (the ``--pixels`` graph) -> their entry.
        model_config: the model's settings (``embed_size`` D, ``img_dim`` Dv, ``max_len``...).
        embed_size, img_dim, max_len: from ``model_config``.
        tokenizer: the tokenizer entry (``kind``, ``vocab`` or ``file``, its settings).
        preprocessing: pixel preprocessing per input (``{"image": {...}}``), with ``--pixels``.
        tensorrt, triton: the records of ``--tensorrt`` engines and the ``--triton`` repository (or None).
        parity: the export's parity reports; verified: whether every gate passed.
        raw: the JSON object as read (for tools that show it).
    """

    format_version: int
    files: dict[str, str]
    graphs: dict[str, dict[str, str]]
    optional_graphs: dict[str, dict[str, Any]]
    model_config: dict[str, Any]
    embed_size: int
    img_dim: int
    max_len: int
    tokenizer: dict[str, Any]
    preprocessing: dict[str, Any]
    tensorrt: dict[str, Any] | None
    triton: dict[str, Any] | None
    parity: dict[str, Any]
    verified: bool | None
    raw: dict[str, Any]

    @property
    def text_encoder(self) -> str:
        """``"bigru"`` or ``"transformer"``."""
        return str(self.model_config.get("text_encoder", "bigru"))

    @property
    def tokenizer_file(self) -> str:
        """The tokenizer's file: ``tokenizer.json`` (subword) or the vocabulary."""
        return str(self.tokenizer.get("file") or self.tokenizer.get("vocab", VOCAB_FILE))

    @classmethod
    def parse(cls, m: dict[str, Any], where: Path) -> "Manifest":
        """Check ``m`` (the JSON of ``where``) and type it.

        Raises:
            BundleError: a missing or malformed entry, saying to re-export.
        """
        for key in ("graphs", "files", "model_config", "tokenizer"):
            if key not in m:
                raise BundleError(f"{where} lacks {key!r}; re-export the bundle")
        for key in ("graphs", "model_config", "tokenizer", "files"):
            if not isinstance(m[key], dict):
                raise BundleError(
                    f"{where}: {key!r} must be a JSON object, got {type(m[key]).__name__}; re-export the "
                    "bundle"
                )
        graphs: dict[str, dict[str, str]] = {}
        for precision in PRECISIONS:
            table = "graphs" if precision == "fp32" else f"{precision}_graphs"
            entries = m.get(table) or {}
            if not isinstance(entries, dict):
                raise BundleError(f"{where}: {table!r} must be a JSON object; re-export the bundle")
            for gname, entry in entries.items():
                if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                    raise BundleError(f"{where}: {table} entry {gname!r} names no file; re-export the bundle")
            if entries:
                graphs[precision] = {g: str(e["file"]) for g, e in entries.items()}
        missing = set(GRAPHS) - set(graphs.get("fp32", {}))
        if missing:
            raise BundleError(f"manifest lacks graphs {sorted(missing)}; re-export the bundle")
        cfg = dict(m["model_config"])
        for key in ("embed_size", "img_dim"):
            value = cfg.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BundleError(
                    f"{where}: model_config.{key} must be a positive int, got {value!r}; re-export the bundle"
                )
        optional = m.get("optional_graphs") or {}
        tensorrt, triton = m.get("tensorrt"), m.get("triton")
        return cls(
            format_version=int(m["format_version"]),
            files={str(k): str(v) for k, v in m["files"].items()},
            graphs=graphs,
            optional_graphs={k: v for k, v in optional.items() if isinstance(v, dict)}
            if isinstance(optional, dict)
            else {},
            model_config=cfg,
            embed_size=int(cfg["embed_size"]),
            img_dim=int(cfg["img_dim"]),
            max_len=int(m["tokenizer"].get("max_len", cfg.get("max_len", 64))),
            tokenizer=dict(m["tokenizer"]),
            preprocessing=dict(m.get("preprocessing") or {}),
            tensorrt=tensorrt if isinstance(tensorrt, dict) else None,
            triton=triton if isinstance(triton, dict) else None,
            parity=dict(m.get("parity") or {}),
            verified=m.get("verified") if isinstance(m.get("verified"), bool) else None,
            raw=m,
        )


@dataclass
class Bundle:
    """A verified bundle folder and its :class:`Manifest`."""

    root: Path
    manifest: Manifest

    def path(self, name: str) -> Path:
        """A file of the bundle (confined to its folder)."""
        return safe_member(self.root, name)

    def graph_path(self, graph: str, precision: str = "fp32") -> Path:
        """Path of ``graph`` ("image_encoder", "text_encoder", "scorer") at ``precision``
        ("fp32", "fp16", or "int8": the int8 text encoder beside the fp32 image encoder and scorer)."""
        table = self.manifest.graphs.get(precision, {})
        if precision == "int8" and not table:
            raise BundleError(
                f"bundle {self.root} has no int8 text encoder (int8 applies to the text encoder only; the "
                "image encoder and scorer run in fp32 beside it); re-export the bundle with `python -m "
                f"export --checkpoint CKPT --out {self.root} --int8`"
            )
        if graph not in table:
            have = ", ".join(self.manifest.graphs)
            raise BundleError(
                f"bundle {self.root} has no {precision} graph {graph!r} (it has {have}); "
                f"re-export with `python -m export{'' if precision == 'fp32' else ' --' + precision}`"
            )
        return self.path(table[graph])

    @property
    def model_config(self) -> dict[str, Any]:
        return dict(self.manifest.model_config)

    @property
    def id_files(self) -> dict[str, str]:
        """The files the bundle id covers, with their sha256: the three fp32 graphs and the vocabulary.

        That is everything an index's vectors are made from and scored with. Optional extras (``--fp16``
        graphs, the ``--pixels`` graph, TensorRT engines, the Triton repository) do not change it, so
        re-exporting a checkpoint with other extras keeps the id and the indexes built with it.
        """
        fp32 = self.manifest.graphs["fp32"]
        return id_files(self.manifest.files, [fp32[g] for g in GRAPHS], self.manifest.tokenizer_file)

    @property
    def bundle_id(self) -> str:
        """Identifies the bundle's weights: the sha256 of its fp32 graphs and vocabulary, combined
        (:attr:`id_files`)."""
        return bundle_id(self.id_files)


def id_files(files: Mapping[str, str], graph_files: Iterable[str], tokenizer_file: str) -> dict[str, str]:
    """The entries of ``files`` (name -> sha256) that a bundle id covers: the fp32 graphs and the tokenizer
    file."""
    names = set(graph_files) | {tokenizer_file}
    return {k: files[k] for k in sorted(names) if k in files}


def bundle_id(covered: Mapping[str, str]) -> str:
    """The bundle id of the files :func:`id_files` picked (16 hex digits)."""
    return hashlib.sha256("".join(f"{k}={v};" for k, v in covered.items()).encode()).hexdigest()[:16]


def load_bundle(root: str | os.PathLike[str], verify: bool = True) -> Bundle:
    """Open a bundle folder, check its format version and (by default) every file's sha256.

    Raises:
        BundleError: missing folder/manifest, unknown format, a file that is missing,
            truncated or tampered, or a path that leaves the bundle.
    """
    rootp = Path(root)
    recover_swap(rootp, MANIFEST_FILE)  # a bundle that a replace killed between two renames left aside
    if not rootp.is_dir():
        raise BundleError(
            f"bundle folder {rootp} does not exist; create one with `python -m export --checkpoint CKPT "
            f"--out {rootp}`"
        )
    mpath = rootp / MANIFEST_FILE
    if not mpath.is_file():
        raise BundleError(
            f"{rootp} has no {MANIFEST_FILE}: not a bundle, or the export did not finish. Re-export it."
        )
    manifest = Manifest.parse(
        read_versioned_json(mpath, error=BundleError, fix="re-export the bundle", version=FORMAT_VERSION),
        mpath,
    )
    listed = [f for table in manifest.graphs.values() for f in table.values()] + [manifest.tokenizer_file]
    unhashed = [n for n in listed if n not in manifest.files]
    if unhashed:
        raise BundleError(
            f"manifest lists {unhashed} without a sha256; the bundle cannot be verified. Re-export it."
        )
    for name, digest in manifest.files.items():
        path = safe_member(rootp, name)
        if not path.is_file():
            raise BundleError(
                f"bundle file {name} is missing from {rootp}; copy the whole bundle folder or re-export"
            )
        if verify and sha256_file(path) != digest:
            raise BundleError(
                f"bundle file {name} does not match its sha256 in the manifest (truncated or modified); "
                "copy it again from the original export or re-export"
            )
    return Bundle(rootp, manifest)


BUNDLE_FILES = "bundle_files"  # index manifest: the files (and sha256) the bundle id was made of


def check_index_bundle(index: str | os.PathLike[str], bundle: Bundle) -> None:
    """Refuse an index built with another bundle, naming the files that differ (when the index recorded them).

    Raises:
        IndexFileError: the ids differ (or the index is unreadable).
    """
    try:
        manifest = read_index_manifest(index)
    except IndexFileError:
        return  # load_index reports it (after putting back an interrupted save)
    if manifest["bundle_id"] == bundle.bundle_id:
        return
    old = manifest.get(BUNDLE_FILES)
    if isinstance(old, dict):
        new = bundle.id_files
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        what = (
            f"these files differ: {', '.join(changed)}"
            if changed
            else "the bundle id is computed differently"
        )
    else:
        what = (
            "the index does not record which files it was built with (indexes written before bundle ids "
            "ignored --fp16 and --pixels)"
        )
    raise IndexFileError(
        f"index {index} was built with bundle {manifest['bundle_id']}, but the loaded bundle is "
        f"{bundle.bundle_id} "
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
    tk = dict(bundle.manifest.tokenizer)
    tk["max_len"] = bundle.manifest.max_len
    return load_text_tokenizer(tk, bundle.path, f"bundle {bundle.root}")
