import datetime

from gansteer.v1 import common_pb2 as _common_pb2
from gansteer.v1 import scoring_pb2 as _scoring_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BudgetUnit(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUDGET_UNIT_UNSPECIFIED: _ClassVar[BudgetUnit]
    BUDGET_UNIT_ITERATIONS: _ClassVar[BudgetUnit]
    BUDGET_UNIT_GENERATOR_CALLS: _ClassVar[BudgetUnit]

class Backend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_UNSPECIFIED: _ClassVar[Backend]
    BACKEND_LOCAL: _ClassVar[Backend]
    BACKEND_REMOTE: _ClassVar[Backend]

class DiversitySpace(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIVERSITY_SPACE_UNSPECIFIED: _ClassVar[DiversitySpace]
    DIVERSITY_SPACE_PIXEL: _ClassVar[DiversitySpace]
    DIVERSITY_SPACE_FEATURES: _ClassVar[DiversitySpace]
    DIVERSITY_SPACE_SOFTMAX: _ClassVar[DiversitySpace]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_WAITING_FOR_FEEDBACK: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class JobView(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_VIEW_UNSPECIFIED: _ClassVar[JobView]
    JOB_VIEW_BASIC: _ClassVar[JobView]
    JOB_VIEW_FULL: _ClassVar[JobView]

class AnswerKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ANSWER_KIND_UNSPECIFIED: _ClassVar[AnswerKind]
    ANSWER_KIND_CHOICE: _ClassVar[AnswerKind]
    ANSWER_KIND_PAIRWISE: _ClassVar[AnswerKind]
    ANSWER_KIND_RATING: _ClassVar[AnswerKind]

class Preference(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PREFERENCE_UNSPECIFIED: _ClassVar[Preference]
    PREFERENCE_LEFT: _ClassVar[Preference]
    PREFERENCE_RIGHT: _ClassVar[Preference]
    PREFERENCE_TIE: _ClassVar[Preference]

class ChoiceAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHOICE_ACTION_PICK: _ClassVar[ChoiceAction]
    CHOICE_ACTION_NONE_GOOD: _ClassVar[ChoiceAction]
    CHOICE_ACTION_UNDO: _ClassVar[ChoiceAction]
BUDGET_UNIT_UNSPECIFIED: BudgetUnit
BUDGET_UNIT_ITERATIONS: BudgetUnit
BUDGET_UNIT_GENERATOR_CALLS: BudgetUnit
BACKEND_UNSPECIFIED: Backend
BACKEND_LOCAL: Backend
BACKEND_REMOTE: Backend
DIVERSITY_SPACE_UNSPECIFIED: DiversitySpace
DIVERSITY_SPACE_PIXEL: DiversitySpace
DIVERSITY_SPACE_FEATURES: DiversitySpace
DIVERSITY_SPACE_SOFTMAX: DiversitySpace
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_WAITING_FOR_FEEDBACK: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
JOB_VIEW_UNSPECIFIED: JobView
JOB_VIEW_BASIC: JobView
JOB_VIEW_FULL: JobView
ANSWER_KIND_UNSPECIFIED: AnswerKind
ANSWER_KIND_CHOICE: AnswerKind
ANSWER_KIND_PAIRWISE: AnswerKind
ANSWER_KIND_RATING: AnswerKind
PREFERENCE_UNSPECIFIED: Preference
PREFERENCE_LEFT: Preference
PREFERENCE_RIGHT: Preference
PREFERENCE_TIE: Preference
CHOICE_ACTION_PICK: ChoiceAction
CHOICE_ACTION_NONE_GOOD: ChoiceAction
CHOICE_ACTION_UNDO: ChoiceAction

class Budget(_message.Message):
    __slots__ = ("unit", "amount")
    UNIT_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    unit: BudgetUnit
    amount: int
    def __init__(self, unit: _Optional[_Union[BudgetUnit, str]] = ..., amount: _Optional[int] = ...) -> None: ...

class Optimizer(_message.Message):
    __slots__ = ("name", "learning_rate", "population_size", "options")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    POPULATION_SIZE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    learning_rate: float
    population_size: int
    options: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., learning_rate: _Optional[float] = ..., population_size: _Optional[int] = ..., options: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class InversionSpec(_message.Message):
    __slots__ = ("targets", "generator", "discriminator", "feature_extractor", "criterion", "lambda_s", "lambda_l", "lambda_nu", "lambda_r", "optimizer", "budget", "restarts", "conditioned_class", "seed", "backend", "initial_latents", "class_vector", "latent_shell")
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    DISCRIMINATOR_FIELD_NUMBER: _ClassVar[int]
    FEATURE_EXTRACTOR_FIELD_NUMBER: _ClassVar[int]
    CRITERION_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_S_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_L_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_NU_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_R_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    CONDITIONED_CLASS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    INITIAL_LATENTS_FIELD_NUMBER: _ClassVar[int]
    CLASS_VECTOR_FIELD_NUMBER: _ClassVar[int]
    LATENT_SHELL_FIELD_NUMBER: _ClassVar[int]
    targets: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    generator: _common_pb2.ModelRef
    discriminator: _common_pb2.ModelRef
    feature_extractor: _common_pb2.ModelRef
    criterion: str
    lambda_s: float
    lambda_l: float
    lambda_nu: float
    lambda_r: float
    optimizer: Optimizer
    budget: Budget
    restarts: int
    conditioned_class: int
    seed: int
    backend: Backend
    initial_latents: _common_pb2.Tensor
    class_vector: str
    latent_shell: bool
    def __init__(self, targets: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., generator: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., discriminator: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., feature_extractor: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., criterion: _Optional[str] = ..., lambda_s: _Optional[float] = ..., lambda_l: _Optional[float] = ..., lambda_nu: _Optional[float] = ..., lambda_r: _Optional[float] = ..., optimizer: _Optional[_Union[Optimizer, _Mapping]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., restarts: _Optional[int] = ..., conditioned_class: _Optional[int] = ..., seed: _Optional[int] = ..., backend: _Optional[_Union[Backend, str]] = ..., initial_latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., class_vector: _Optional[str] = ..., latent_shell: _Optional[bool] = ...) -> None: ...

class EmbeddingAMSpec(_message.Message):
    __slots__ = ("generator", "classifier", "target_class", "new_label", "init", "top_k", "top_k_samples", "init_sigma", "optimizer", "steps", "latents_per_step", "resample_every", "clamp_min", "clamp_max", "trials", "diversity_weight", "diversity_space", "diversity_pairs", "judge", "feature_extractor", "eval_samples", "accuracy_tolerance", "register_as", "dry_run", "seed", "backend")
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_FIELD_NUMBER: _ClassVar[int]
    TARGET_CLASS_FIELD_NUMBER: _ClassVar[int]
    NEW_LABEL_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_K_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    INIT_SIGMA_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LATENTS_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    RESAMPLE_EVERY_FIELD_NUMBER: _ClassVar[int]
    CLAMP_MIN_FIELD_NUMBER: _ClassVar[int]
    CLAMP_MAX_FIELD_NUMBER: _ClassVar[int]
    TRIALS_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_SPACE_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_PAIRS_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_EXTRACTOR_FIELD_NUMBER: _ClassVar[int]
    EVAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    REGISTER_AS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    generator: _common_pb2.ModelRef
    classifier: _common_pb2.ModelRef
    target_class: str
    new_label: str
    init: str
    top_k: int
    top_k_samples: int
    init_sigma: float
    optimizer: Optimizer
    steps: int
    latents_per_step: int
    resample_every: int
    clamp_min: float
    clamp_max: float
    trials: int
    diversity_weight: float
    diversity_space: DiversitySpace
    diversity_pairs: int
    judge: _common_pb2.ModelRef
    feature_extractor: _common_pb2.ModelRef
    eval_samples: int
    accuracy_tolerance: float
    register_as: str
    dry_run: bool
    seed: int
    backend: Backend
    def __init__(self, generator: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., classifier: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., target_class: _Optional[str] = ..., new_label: _Optional[str] = ..., init: _Optional[str] = ..., top_k: _Optional[int] = ..., top_k_samples: _Optional[int] = ..., init_sigma: _Optional[float] = ..., optimizer: _Optional[_Union[Optimizer, _Mapping]] = ..., steps: _Optional[int] = ..., latents_per_step: _Optional[int] = ..., resample_every: _Optional[int] = ..., clamp_min: _Optional[float] = ..., clamp_max: _Optional[float] = ..., trials: _Optional[int] = ..., diversity_weight: _Optional[float] = ..., diversity_space: _Optional[_Union[DiversitySpace, str]] = ..., diversity_pairs: _Optional[int] = ..., judge: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., feature_extractor: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., eval_samples: _Optional[int] = ..., accuracy_tolerance: _Optional[float] = ..., register_as: _Optional[str] = ..., dry_run: _Optional[bool] = ..., seed: _Optional[int] = ..., backend: _Optional[_Union[Backend, str]] = ...) -> None: ...

class LatentSearchSpec(_message.Message):
    __slots__ = ("generator", "objective", "optimizer", "budget", "restarts", "search_class_embedding", "perturbations", "perturbation_sigma", "percentile", "seed", "backend", "classes", "scorer", "judge", "discriminator", "prior_weight")
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_CLASS_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    PERTURBATIONS_FIELD_NUMBER: _ClassVar[int]
    PERTURBATION_SIGMA_FIELD_NUMBER: _ClassVar[int]
    PERCENTILE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    SCORER_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    DISCRIMINATOR_FIELD_NUMBER: _ClassVar[int]
    PRIOR_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    generator: _common_pb2.ModelRef
    objective: _containers.RepeatedCompositeFieldContainer[_scoring_pb2.ObjectiveTerm]
    optimizer: Optimizer
    budget: Budget
    restarts: int
    search_class_embedding: bool
    perturbations: int
    perturbation_sigma: float
    percentile: float
    seed: int
    backend: Backend
    classes: _containers.RepeatedScalarFieldContainer[int]
    scorer: _common_pb2.ModelRef
    judge: _common_pb2.ModelRef
    discriminator: _common_pb2.ModelRef
    prior_weight: float
    def __init__(self, generator: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., objective: _Optional[_Iterable[_Union[_scoring_pb2.ObjectiveTerm, _Mapping]]] = ..., optimizer: _Optional[_Union[Optimizer, _Mapping]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., restarts: _Optional[int] = ..., search_class_embedding: _Optional[bool] = ..., perturbations: _Optional[int] = ..., perturbation_sigma: _Optional[float] = ..., percentile: _Optional[float] = ..., seed: _Optional[int] = ..., backend: _Optional[_Union[Backend, str]] = ..., classes: _Optional[_Iterable[int]] = ..., scorer: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., judge: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., discriminator: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., prior_weight: _Optional[float] = ...) -> None: ...

class PIRTuningSpec(_message.Message):
    __slots__ = ("generator", "discriminator", "pir_estimator", "check_estimator", "real_data", "pir_weight", "learning_rate", "steps", "batch_size", "anchor_weight", "check_every", "patience", "no_guards", "temperature", "register_as", "seed", "objective", "eval_images")
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    DISCRIMINATOR_FIELD_NUMBER: _ClassVar[int]
    PIR_ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    CHECK_ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    REAL_DATA_FIELD_NUMBER: _ClassVar[int]
    PIR_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CHECK_EVERY_FIELD_NUMBER: _ClassVar[int]
    PATIENCE_FIELD_NUMBER: _ClassVar[int]
    NO_GUARDS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    REGISTER_AS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    EVAL_IMAGES_FIELD_NUMBER: _ClassVar[int]
    generator: _common_pb2.ModelRef
    discriminator: _common_pb2.ModelRef
    pir_estimator: _common_pb2.ModelRef
    check_estimator: _common_pb2.ModelRef
    real_data: str
    pir_weight: float
    learning_rate: float
    steps: int
    batch_size: int
    anchor_weight: float
    check_every: int
    patience: int
    no_guards: bool
    temperature: float
    register_as: str
    seed: int
    objective: _scoring_pb2.OutputRequest
    eval_images: int
    def __init__(self, generator: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., discriminator: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., pir_estimator: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., check_estimator: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., real_data: _Optional[str] = ..., pir_weight: _Optional[float] = ..., learning_rate: _Optional[float] = ..., steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., anchor_weight: _Optional[float] = ..., check_every: _Optional[int] = ..., patience: _Optional[int] = ..., no_guards: _Optional[bool] = ..., temperature: _Optional[float] = ..., register_as: _Optional[str] = ..., seed: _Optional[int] = ..., objective: _Optional[_Union[_scoring_pb2.OutputRequest, _Mapping]] = ..., eval_images: _Optional[int] = ...) -> None: ...

class SimulatedImpressions(_message.Message):
    __slots__ = ("generator", "objective", "images", "impressions", "seed")
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    IMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    generator: _common_pb2.ModelRef
    objective: _scoring_pb2.OutputRequest
    images: int
    impressions: int
    seed: int
    def __init__(self, generator: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., objective: _Optional[_Union[_scoring_pb2.OutputRequest, _Mapping]] = ..., images: _Optional[int] = ..., impressions: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class PIREstimatorSpec(_message.Message):
    __slots__ = ("dataset", "simulate", "backbone", "bins", "learning_rate", "epochs", "held_out", "temperature", "single", "init_estimator", "register_as", "seed")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SIMULATE_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    BINS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    HELD_OUT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SINGLE_FIELD_NUMBER: _ClassVar[int]
    INIT_ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    REGISTER_AS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    simulate: SimulatedImpressions
    backbone: _common_pb2.ModelRef
    bins: int
    learning_rate: float
    epochs: int
    held_out: float
    temperature: float
    single: bool
    init_estimator: _common_pb2.ModelRef
    register_as: str
    seed: int
    def __init__(self, dataset: _Optional[str] = ..., simulate: _Optional[_Union[SimulatedImpressions, _Mapping]] = ..., backbone: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., bins: _Optional[int] = ..., learning_rate: _Optional[float] = ..., epochs: _Optional[int] = ..., held_out: _Optional[float] = ..., temperature: _Optional[float] = ..., single: _Optional[bool] = ..., init_estimator: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., register_as: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class HumanNESSpec(_message.Message):
    __slots__ = ("generator", "basis", "basis_images", "basis_components", "basis_scenes", "sigma", "images", "pairs_per_image", "rounds", "raters_per_pair", "answer_levels", "learning_rate", "condition", "register_as", "round_expiry_s", "seed", "forking_reference", "feature_extractor")
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    BASIS_FIELD_NUMBER: _ClassVar[int]
    BASIS_IMAGES_FIELD_NUMBER: _ClassVar[int]
    BASIS_COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    BASIS_SCENES_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PAIRS_PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    RATERS_PER_PAIR_FIELD_NUMBER: _ClassVar[int]
    ANSWER_LEVELS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    REGISTER_AS_FIELD_NUMBER: _ClassVar[int]
    ROUND_EXPIRY_S_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FORKING_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_EXTRACTOR_FIELD_NUMBER: _ClassVar[int]
    generator: _common_pb2.ModelRef
    basis: str
    basis_images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    basis_components: int
    basis_scenes: int
    sigma: float
    images: int
    pairs_per_image: int
    rounds: int
    raters_per_pair: int
    answer_levels: int
    learning_rate: float
    condition: _common_pb2.ClassCondition
    register_as: str
    round_expiry_s: float
    seed: int
    forking_reference: _common_pb2.ModelRef
    feature_extractor: _common_pb2.ModelRef
    def __init__(self, generator: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., basis: _Optional[str] = ..., basis_images: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., basis_components: _Optional[int] = ..., basis_scenes: _Optional[int] = ..., sigma: _Optional[float] = ..., images: _Optional[int] = ..., pairs_per_image: _Optional[int] = ..., rounds: _Optional[int] = ..., raters_per_pair: _Optional[int] = ..., answer_levels: _Optional[int] = ..., learning_rate: _Optional[float] = ..., condition: _Optional[_Union[_common_pb2.ClassCondition, _Mapping]] = ..., register_as: _Optional[str] = ..., round_expiry_s: _Optional[float] = ..., seed: _Optional[int] = ..., forking_reference: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., feature_extractor: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ...) -> None: ...

class InteractiveEvolutionSpec(_message.Message):
    __slots__ = ("generator", "mu", "offspring", "mutation_rate", "rounds", "condition", "seed", "fixed_mutation_rate", "round_expiry_s", "backend", "adapt_mutation_rate")
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    MU_FIELD_NUMBER: _ClassVar[int]
    OFFSPRING_FIELD_NUMBER: _ClassVar[int]
    MUTATION_RATE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FIXED_MUTATION_RATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_EXPIRY_S_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    ADAPT_MUTATION_RATE_FIELD_NUMBER: _ClassVar[int]
    generator: _common_pb2.ModelRef
    mu: int
    offspring: int
    mutation_rate: float
    rounds: int
    condition: _common_pb2.ClassCondition
    seed: int
    fixed_mutation_rate: bool
    round_expiry_s: float
    backend: Backend
    adapt_mutation_rate: bool
    def __init__(self, generator: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., mu: _Optional[int] = ..., offspring: _Optional[int] = ..., mutation_rate: _Optional[float] = ..., rounds: _Optional[int] = ..., condition: _Optional[_Union[_common_pb2.ClassCondition, _Mapping]] = ..., seed: _Optional[int] = ..., fixed_mutation_rate: _Optional[bool] = ..., round_expiry_s: _Optional[float] = ..., backend: _Optional[_Union[Backend, str]] = ..., adapt_mutation_rate: _Optional[bool] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("inversion", "embedding_am", "latent_search", "pir_tuning", "human_nes", "interactive_evolution", "pir_estimator", "priority", "time_limit_s", "idempotency_key", "labels", "preview_every")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    INVERSION_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_AM_FIELD_NUMBER: _ClassVar[int]
    LATENT_SEARCH_FIELD_NUMBER: _ClassVar[int]
    PIR_TUNING_FIELD_NUMBER: _ClassVar[int]
    HUMAN_NES_FIELD_NUMBER: _ClassVar[int]
    INTERACTIVE_EVOLUTION_FIELD_NUMBER: _ClassVar[int]
    PIR_ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TIME_LIMIT_S_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    inversion: InversionSpec
    embedding_am: EmbeddingAMSpec
    latent_search: LatentSearchSpec
    pir_tuning: PIRTuningSpec
    human_nes: HumanNESSpec
    interactive_evolution: InteractiveEvolutionSpec
    pir_estimator: PIREstimatorSpec
    priority: int
    time_limit_s: float
    idempotency_key: str
    labels: _containers.ScalarMap[str, str]
    preview_every: int
    def __init__(self, inversion: _Optional[_Union[InversionSpec, _Mapping]] = ..., embedding_am: _Optional[_Union[EmbeddingAMSpec, _Mapping]] = ..., latent_search: _Optional[_Union[LatentSearchSpec, _Mapping]] = ..., pir_tuning: _Optional[_Union[PIRTuningSpec, _Mapping]] = ..., human_nes: _Optional[_Union[HumanNESSpec, _Mapping]] = ..., interactive_evolution: _Optional[_Union[InteractiveEvolutionSpec, _Mapping]] = ..., pir_estimator: _Optional[_Union[PIREstimatorSpec, _Mapping]] = ..., priority: _Optional[int] = ..., time_limit_s: _Optional[float] = ..., idempotency_key: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., preview_every: _Optional[int] = ...) -> None: ...

class RoundItem(_message.Message):
    __slots__ = ("item_id", "seed", "latent", "condition", "parent_ids")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LATENT_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    PARENT_IDS_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    seed: int
    latent: _common_pb2.Tensor
    condition: _common_pb2.ClassCondition
    parent_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_id: _Optional[str] = ..., seed: _Optional[int] = ..., latent: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., condition: _Optional[_Union[_common_pb2.ClassCondition, _Mapping]] = ..., parent_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RoundPair(_message.Message):
    __slots__ = ("left", "right")
    LEFT_FIELD_NUMBER: _ClassVar[int]
    RIGHT_FIELD_NUMBER: _ClassVar[int]
    left: int
    right: int
    def __init__(self, left: _Optional[int] = ..., right: _Optional[int] = ...) -> None: ...

class FeedbackRound(_message.Message):
    __slots__ = ("round_id", "images", "choose", "num_pairs", "round", "answer", "items", "pairs", "generator", "expires_at", "allow_repeats", "answers_required", "answers_received", "rating_min", "rating_max", "actions", "step_size", "answer_levels")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CHOOSE_FIELD_NUMBER: _ClassVar[int]
    NUM_PAIRS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ALLOW_REPEATS_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    RATING_MIN_FIELD_NUMBER: _ClassVar[int]
    RATING_MAX_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    ANSWER_LEVELS_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    images: _common_pb2.ImageBatch
    choose: int
    num_pairs: int
    round: int
    answer: AnswerKind
    items: _containers.RepeatedCompositeFieldContainer[RoundItem]
    pairs: _containers.RepeatedCompositeFieldContainer[RoundPair]
    generator: _common_pb2.ModelRef
    expires_at: _timestamp_pb2.Timestamp
    allow_repeats: bool
    answers_required: int
    answers_received: int
    rating_min: float
    rating_max: float
    actions: _containers.RepeatedScalarFieldContainer[ChoiceAction]
    step_size: float
    answer_levels: int
    def __init__(self, round_id: _Optional[str] = ..., images: _Optional[_Union[_common_pb2.ImageBatch, _Mapping]] = ..., choose: _Optional[int] = ..., num_pairs: _Optional[int] = ..., round: _Optional[int] = ..., answer: _Optional[_Union[AnswerKind, str]] = ..., items: _Optional[_Iterable[_Union[RoundItem, _Mapping]]] = ..., pairs: _Optional[_Iterable[_Union[RoundPair, _Mapping]]] = ..., generator: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., allow_repeats: _Optional[bool] = ..., answers_required: _Optional[int] = ..., answers_received: _Optional[int] = ..., rating_min: _Optional[float] = ..., rating_max: _Optional[float] = ..., actions: _Optional[_Iterable[_Union[ChoiceAction, str]]] = ..., step_size: _Optional[float] = ..., answer_levels: _Optional[int] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "kind", "state", "owner", "created_at", "started_at", "finished_at", "step", "total_steps", "criterion", "error", "error_details", "cancel_requested", "attempts", "last_event_id", "pending_round", "labels", "priority", "expires_at", "spec")
    class CriterionEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    CRITERION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_DETAILS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    PENDING_ROUND_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    state: JobState
    owner: str
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    step: int
    total_steps: int
    criterion: _containers.ScalarMap[str, float]
    error: str
    error_details: _containers.RepeatedCompositeFieldContainer[_common_pb2.ErrorDetail]
    cancel_requested: bool
    attempts: int
    last_event_id: str
    pending_round: FeedbackRound
    labels: _containers.ScalarMap[str, str]
    priority: int
    expires_at: _timestamp_pb2.Timestamp
    spec: JobSpec
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., owner: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., criterion: _Optional[_Mapping[str, float]] = ..., error: _Optional[str] = ..., error_details: _Optional[_Iterable[_Union[_common_pb2.ErrorDetail, _Mapping]]] = ..., cancel_requested: _Optional[bool] = ..., attempts: _Optional[int] = ..., last_event_id: _Optional[str] = ..., pending_round: _Optional[_Union[FeedbackRound, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., priority: _Optional[int] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class SubmitJobResponse(_message.Message):
    __slots__ = ("job_id", "existing", "job")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EXISTING_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    existing: bool
    job: Job
    def __init__(self, job_id: _Optional[str] = ..., existing: _Optional[bool] = ..., job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id", "view")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    view: JobView
    def __init__(self, job_id: _Optional[str] = ..., view: _Optional[_Union[JobView, str]] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "after_event_id", "skip_previews")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    SKIP_PREVIEWS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_event_id: str
    skip_previews: bool
    def __init__(self, job_id: _Optional[str] = ..., after_event_id: _Optional[str] = ..., skip_previews: _Optional[bool] = ...) -> None: ...

class StateChange(_message.Message):
    __slots__ = ("state", "previous", "message")
    STATE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    previous: JobState
    message: str
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., previous: _Optional[_Union[JobState, str]] = ..., message: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total_steps", "criterion", "generator_calls", "elapsed_s")
    class CriterionEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    CRITERION_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_CALLS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    criterion: _containers.ScalarMap[str, float]
    generator_calls: int
    elapsed_s: float
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., criterion: _Optional[_Mapping[str, float]] = ..., generator_calls: _Optional[int] = ..., elapsed_s: _Optional[float] = ...) -> None: ...

class Preview(_message.Message):
    __slots__ = ("step", "images")
    STEP_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    step: int
    images: _common_pb2.ImageBatch
    def __init__(self, step: _Optional[int] = ..., images: _Optional[_Union[_common_pb2.ImageBatch, _Mapping]] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("event_id", "job_id", "time", "state_change", "progress", "preview", "feedback_round", "result")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_ROUND_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    job_id: str
    time: _timestamp_pb2.Timestamp
    state_change: StateChange
    progress: Progress
    preview: Preview
    feedback_round: FeedbackRound
    result: JobResult
    def __init__(self, event_id: _Optional[str] = ..., job_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state_change: _Optional[_Union[StateChange, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., preview: _Optional[_Union[Preview, _Mapping]] = ..., feedback_round: _Optional[_Union[FeedbackRound, _Mapping]] = ..., result: _Optional[_Union[JobResult, _Mapping]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "states", "kind", "labels", "view")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    states: _containers.RepeatedScalarFieldContainer[JobState]
    kind: str
    labels: _containers.ScalarMap[str, str]
    view: JobView
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., states: _Optional[_Iterable[_Union[JobState, str]]] = ..., kind: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., view: _Optional[_Union[JobView, str]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetResultRequest(_message.Message):
    __slots__ = ("job_id", "image_format")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    image_format: _common_pb2.ImageFormat
    def __init__(self, job_id: _Optional[str] = ..., image_format: _Optional[_Union[_common_pb2.ImageFormat, str]] = ...) -> None: ...

class CriterionCurve(_message.Message):
    __slots__ = ("steps", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...
    STEPS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.MessageMap[str, _common_pb2.Tensor]
    def __init__(self, steps: _Optional[_Iterable[int]] = ..., values: _Optional[_Mapping[str, _common_pb2.Tensor]] = ...) -> None: ...

class ItemMetrics(_message.Message):
    __slots__ = ("values",)
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.ScalarMap[str, float]
    def __init__(self, values: _Optional[_Mapping[str, float]] = ...) -> None: ...

class JobResult(_message.Message):
    __slots__ = ("job_id", "images", "latents", "class_embeddings", "metrics", "item_metrics", "curve", "models", "tensors", "generator", "class_ids")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class TensorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    CLASS_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ITEM_METRICS_FIELD_NUMBER: _ClassVar[int]
    CURVE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    CLASS_IDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    images: _common_pb2.ImageBatch
    latents: _common_pb2.Tensor
    class_embeddings: _common_pb2.Tensor
    metrics: _containers.ScalarMap[str, float]
    item_metrics: _containers.RepeatedCompositeFieldContainer[ItemMetrics]
    curve: CriterionCurve
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelRef]
    tensors: _containers.MessageMap[str, _common_pb2.Tensor]
    generator: _common_pb2.ModelRef
    class_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, job_id: _Optional[str] = ..., images: _Optional[_Union[_common_pb2.ImageBatch, _Mapping]] = ..., latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., class_embeddings: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., item_metrics: _Optional[_Iterable[_Union[ItemMetrics, _Mapping]]] = ..., curve: _Optional[_Union[CriterionCurve, _Mapping]] = ..., models: _Optional[_Iterable[_Union[_common_pb2.ModelRef, _Mapping]]] = ..., tensors: _Optional[_Mapping[str, _common_pb2.Tensor]] = ..., generator: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., class_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GetResultResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: JobResult
    def __init__(self, result: _Optional[_Union[JobResult, _Mapping]] = ...) -> None: ...

class PairwiseJudgement(_message.Message):
    __slots__ = ("pair", "preference", "score")
    PAIR_FIELD_NUMBER: _ClassVar[int]
    PREFERENCE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    pair: int
    preference: Preference
    score: float
    def __init__(self, pair: _Optional[int] = ..., preference: _Optional[_Union[Preference, str]] = ..., score: _Optional[float] = ...) -> None: ...

class PairwiseJudgements(_message.Message):
    __slots__ = ("judgements",)
    JUDGEMENTS_FIELD_NUMBER: _ClassVar[int]
    judgements: _containers.RepeatedCompositeFieldContainer[PairwiseJudgement]
    def __init__(self, judgements: _Optional[_Iterable[_Union[PairwiseJudgement, _Mapping]]] = ...) -> None: ...

class Choice(_message.Message):
    __slots__ = ("indices", "action", "step_size")
    INDICES_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    indices: _containers.RepeatedScalarFieldContainer[int]
    action: ChoiceAction
    step_size: float
    def __init__(self, indices: _Optional[_Iterable[int]] = ..., action: _Optional[_Union[ChoiceAction, str]] = ..., step_size: _Optional[float] = ...) -> None: ...

class Ratings(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class SubmitFeedbackRequest(_message.Message):
    __slots__ = ("job_id", "round_id", "choice", "pairwise", "ratings", "rater", "idempotency_key", "latency_s")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    PAIRWISE_FIELD_NUMBER: _ClassVar[int]
    RATINGS_FIELD_NUMBER: _ClassVar[int]
    RATER_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round_id: str
    choice: Choice
    pairwise: PairwiseJudgements
    ratings: Ratings
    rater: str
    idempotency_key: str
    latency_s: float
    def __init__(self, job_id: _Optional[str] = ..., round_id: _Optional[str] = ..., choice: _Optional[_Union[Choice, _Mapping]] = ..., pairwise: _Optional[_Union[PairwiseJudgements, _Mapping]] = ..., ratings: _Optional[_Union[Ratings, _Mapping]] = ..., rater: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., latency_s: _Optional[float] = ...) -> None: ...

class SubmitFeedbackResponse(_message.Message):
    __slots__ = ("job", "duplicate")
    JOB_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    job: Job
    duplicate: bool
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class Interaction(_message.Message):
    __slots__ = ("job_id", "round_id", "round", "rater", "time", "latency_s", "answer_kind", "choice", "pairwise", "ratings", "items", "pairs", "generator", "idempotency_key")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    RATER_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    ANSWER_KIND_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    PAIRWISE_FIELD_NUMBER: _ClassVar[int]
    RATINGS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round_id: str
    round: int
    rater: str
    time: _timestamp_pb2.Timestamp
    latency_s: float
    answer_kind: AnswerKind
    choice: Choice
    pairwise: PairwiseJudgements
    ratings: Ratings
    items: _containers.RepeatedCompositeFieldContainer[RoundItem]
    pairs: _containers.RepeatedCompositeFieldContainer[RoundPair]
    generator: _common_pb2.ModelRef
    idempotency_key: str
    def __init__(self, job_id: _Optional[str] = ..., round_id: _Optional[str] = ..., round: _Optional[int] = ..., rater: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., latency_s: _Optional[float] = ..., answer_kind: _Optional[_Union[AnswerKind, str]] = ..., choice: _Optional[_Union[Choice, _Mapping]] = ..., pairwise: _Optional[_Union[PairwiseJudgements, _Mapping]] = ..., ratings: _Optional[_Union[Ratings, _Mapping]] = ..., items: _Optional[_Iterable[_Union[RoundItem, _Mapping]]] = ..., pairs: _Optional[_Iterable[_Union[RoundPair, _Mapping]]] = ..., generator: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class ListInteractionsRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListInteractionsResponse(_message.Message):
    __slots__ = ("interactions",)
    INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    interactions: _containers.RepeatedCompositeFieldContainer[Interaction]
    def __init__(self, interactions: _Optional[_Iterable[_Union[Interaction, _Mapping]]] = ...) -> None: ...

class ImpressionRecord(_message.Message):
    __slots__ = ("dataset", "generator", "seed", "latent", "class_id", "image_id", "impressions", "interactions", "cohort", "time", "reporter", "received_at", "source")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LATENT_FIELD_NUMBER: _ClassVar[int]
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    IMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    COHORT_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    REPORTER_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    generator: _common_pb2.ModelRef
    seed: int
    latent: _common_pb2.Tensor
    class_id: int
    image_id: str
    impressions: int
    interactions: int
    cohort: str
    time: _timestamp_pb2.Timestamp
    reporter: str
    received_at: _timestamp_pb2.Timestamp
    source: str
    def __init__(self, dataset: _Optional[str] = ..., generator: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., seed: _Optional[int] = ..., latent: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., class_id: _Optional[int] = ..., image_id: _Optional[str] = ..., impressions: _Optional[int] = ..., interactions: _Optional[int] = ..., cohort: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reporter: _Optional[str] = ..., received_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[str] = ...) -> None: ...

class ReportImpressionsRequest(_message.Message):
    __slots__ = ("records", "idempotency_key")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[ImpressionRecord]
    idempotency_key: str
    def __init__(self, records: _Optional[_Iterable[_Union[ImpressionRecord, _Mapping]]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class ReportImpressionsResponse(_message.Message):
    __slots__ = ("recorded", "total", "duplicate")
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    recorded: int
    total: int
    duplicate: bool
    def __init__(self, recorded: _Optional[int] = ..., total: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class ListImpressionsRequest(_message.Message):
    __slots__ = ("dataset", "offset", "page_size")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    offset: int
    page_size: int
    def __init__(self, dataset: _Optional[str] = ..., offset: _Optional[int] = ..., page_size: _Optional[int] = ...) -> None: ...

class ListImpressionsResponse(_message.Message):
    __slots__ = ("records", "total")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[ImpressionRecord]
    total: int
    def __init__(self, records: _Optional[_Iterable[_Union[ImpressionRecord, _Mapping]]] = ..., total: _Optional[int] = ...) -> None: ...

class JobOption(_message.Message):
    __slots__ = ("name", "type", "default_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    default_json: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., default_json: _Optional[str] = ...) -> None: ...

class JobKindInfo(_message.Message):
    __slots__ = ("name", "description", "has_rounds", "spec_message", "options")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    HAS_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SPEC_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    has_rounds: bool
    spec_message: str
    options: _containers.RepeatedCompositeFieldContainer[JobOption]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., has_rounds: _Optional[bool] = ..., spec_message: _Optional[str] = ..., options: _Optional[_Iterable[_Union[JobOption, _Mapping]]] = ...) -> None: ...

class ListJobKindsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobKindsResponse(_message.Message):
    __slots__ = ("kinds",)
    KINDS_FIELD_NUMBER: _ClassVar[int]
    kinds: _containers.RepeatedCompositeFieldContainer[JobKindInfo]
    def __init__(self, kinds: _Optional[_Iterable[_Union[JobKindInfo, _Mapping]]] = ...) -> None: ...

class OptimizerInfo(_message.Message):
    __slots__ = ("name", "gradient", "description", "default_learning_rate", "default_population")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_POPULATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    gradient: bool
    description: str
    default_learning_rate: float
    default_population: int
    def __init__(self, name: _Optional[str] = ..., gradient: _Optional[bool] = ..., description: _Optional[str] = ..., default_learning_rate: _Optional[float] = ..., default_population: _Optional[int] = ...) -> None: ...

class ListOptimizersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListOptimizersResponse(_message.Message):
    __slots__ = ("optimizers",)
    OPTIMIZERS_FIELD_NUMBER: _ClassVar[int]
    optimizers: _containers.RepeatedCompositeFieldContainer[OptimizerInfo]
    def __init__(self, optimizers: _Optional[_Iterable[_Union[OptimizerInfo, _Mapping]]] = ...) -> None: ...
