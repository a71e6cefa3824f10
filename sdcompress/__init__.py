"""sdcompress: train residual networks with stochastic depth, prune their blocks by learned survival statistics,
and ship them.

The Python API is the pipeline; every stage is a function on an `nn.Module` and your own `(images, labels)`
batches: `find_blocks` / `survey_blocks` (the residual blocks of any network, found by a forward pass),
`train_stochastic_depth` (from scratch or retrofitted onto pretrained weights; returns `Trained`),
`measure_drop_effects` (`DropEffects` without training), `prune` / `remove_blocks`, `recalibrate`, `finetune`
(distilled from a teacher), `binarize`, `export` (`.onnx`, `.ort`, `.mlpackage`, each verified) / `export_onnx`,
`footprint`, and `save` / `load`. `help(sdcompress.prune)` and the others show arguments, returns and an example.
The API is imported on first use, so `import sdcompress` stays light.
"""

__version__ = "0.1.0"

API = ("find_blocks", "survey_blocks", "remove_blocks", "measure_drop_effects", "prune", "train_stochastic_depth", "recalibrate",
       "finetune", "binarize", "export", "footprint", "export_onnx", "save", "load", "DropEffects", "Trained")
__all__ = ["__version__", *API]


def __dir__() -> list[str]:
    """The API too (it is imported on first use), so tab-completion and IDEs list it."""
    return sorted(set(globals()) | set(__all__))


def __getattr__(name: str):
    if name in API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'sdcompress' has no attribute {name!r}")
