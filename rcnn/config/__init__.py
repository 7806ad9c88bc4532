"""Pipeline configuration: typed dataclasses loaded once from pipelines.yaml, ``--set`` overrides, readable views.

``fields`` declares how a setting is described, ``schema`` holds the sections, ``loading`` reads and checks
a pipelines file, ``seeds`` names seed runs, ``yamlfile`` parses YAML and ``--set`` values, and ``view`` prints
configurations for people.
"""

from rcnn.config.fields import Range, setting
from rcnn.config.loading import (
    SHIPPED_PIPELINES,
    PipelineFile,
    default_pipelines_file,
    fingerprint_params,
    section_kwargs,
)
from rcnn.config.schema import (
    INPUT_SIZES,
    BBoxConfig,
    ClusterConfig,
    DataConfig,
    EvaluateConfig,
    FastConfig,
    FeaturesConfig,
    FinetuneConfig,
    ModelConfig,
    PipelineConfig,
    ProposalsConfig,
    SPPConfig,
    SVMConfig,
    SyntheticConfig,
)
from rcnn.config.yamlfile import parse_override

__all__ = [
    "INPUT_SIZES",
    "SHIPPED_PIPELINES",
    "BBoxConfig",
    "ClusterConfig",
    "DataConfig",
    "EvaluateConfig",
    "FastConfig",
    "FeaturesConfig",
    "FinetuneConfig",
    "ModelConfig",
    "PipelineConfig",
    "PipelineFile",
    "ProposalsConfig",
    "Range",
    "SPPConfig",
    "SVMConfig",
    "SyntheticConfig",
    "default_pipelines_file",
    "fingerprint_params",
    "parse_override",
    "section_kwargs",
    "setting",
]
