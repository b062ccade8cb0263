"""``batchcam import-model SRC --out DST.pt``: a model trained elsewhere, declared once, written as a
batchcam checkpoint that records its architecture, classes and preprocessing (``model.importing``),
so every later command reads it with no flags."""
from __future__ import annotations

from batchcam.config import ImportModelConfig
from batchcam.model.importing import Declaration, ImportReport, import_model


def declaration(config: ImportModelConfig) -> Declaration:
    """What the flags declare; what they leave out is left to the file, then to the defaults."""
    return Declaration(arch=config.arch, classes=config.classes, input_size=config.input_size, resize=config.resize,
                       mean=config.mean, std=config.std, channels=config.channels, trust_pickle=config.trust_pickle)


def run_import(config: ImportModelConfig) -> ImportReport:
    """Read, check and write; UsageError (exit 2, one line, DST.pt untouched) for anything it refuses."""
    config.validate()
    return import_model(config.source, config.out, declaration(config))
