"""gansteer: a Python client for steering pretrained image generators through gansteer's gRPC services.

The services generate images from registered generators, score images with classifiers, discriminators and
simulated interaction objectives, and run long optimisation jobs (inversion of a target image, embedding
activation maximisation, latent search, PIR tuning, interactive evolution). This package holds the client
(`Client`, `Job`, the asyncio `AsyncClient`), the wire protocol (`gansteer.v1`) and the helpers that convert numpy
arrays and images to and from it (`gansteer.tensors`); it never depends on torch or on the server package.

    import gansteer

    client = gansteer.Client("localhost:50053")
    job = client.invert("photo.png", model="scenes-gen", budget=300)
    result = job.result()          # waits, with a progress bar: job.wait(progress=True)
    result.images[0].save("best.png")

`gansteer.embedded()` runs the whole stack in this process when the server package is installed.
"""

from gansteer.aio import AsyncClient, AsyncJob
from gansteer.client import Client
from gansteer.embedded import embedded
from gansteer.errors import (
    Cancelled,
    DeadlineExceeded,
    ErrorDetail,
    FailedPrecondition,
    GansteerError,
    Internal,
    InvalidArgument,
    JobCancelled,
    JobFailed,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RoundClosed,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from gansteer.job import Job
from gansteer.kinds import (
    EmbeddingAMOptions,
    EmbeddingAMResult,
    EvolutionOptions,
    EvolutionResult,
    HumanNESOptions,
    HumanNESResult,
    InversionOptions,
    InversionResult,
    LatentSearchOptions,
    LatentSearchResult,
)
from gansteer.saved import SavedResult, load_result
from gansteer.types import (
    Answer,
    AnswerKind,
    AsyncRater,
    AsyncRound,
    ChoiceAction,
    CriterionCurve,
    FeedbackResult,
    FeedbackRound,
    FeedbackRoundEvent,
    GenerationResult,
    Interaction,
    JobEvent,
    JobKindInfo,
    JobOption,
    JobResult,
    JobState,
    JobStatus,
    ModelInfo,
    OptimizerInfo,
    PreviewEvent,
    ProgressEvent,
    Rater,
    ResultEvent,
    Round,
    RoundItem,
    ScoreOutput,
    ScoreResult,
    ScorerInfo,
    ScorerParam,
    StateChanged,
)

__version__ = "0.1.0"

__all__ = [
    "Answer",
    "AnswerKind",
    "AsyncClient",
    "AsyncJob",
    "AsyncRater",
    "AsyncRound",
    "Cancelled",
    "ChoiceAction",
    "Client",
    "CriterionCurve",
    "DeadlineExceeded",
    "EmbeddingAMOptions",
    "EmbeddingAMResult",
    "ErrorDetail",
    "EvolutionOptions",
    "EvolutionResult",
    "FailedPrecondition",
    "FeedbackResult",
    "FeedbackRound",
    "FeedbackRoundEvent",
    "GansteerError",
    "GenerationResult",
    "HumanNESOptions",
    "HumanNESResult",
    "Interaction",
    "Internal",
    "InvalidArgument",
    "InversionOptions",
    "InversionResult",
    "Job",
    "JobCancelled",
    "JobEvent",
    "JobFailed",
    "JobKindInfo",
    "JobOption",
    "JobResult",
    "JobState",
    "JobStatus",
    "LatentSearchOptions",
    "LatentSearchResult",
    "ModelInfo",
    "NotFound",
    "OptimizerInfo",
    "PermissionDenied",
    "PreviewEvent",
    "ProgressEvent",
    "Rater",
    "ResourceExhausted",
    "ResultEvent",
    "Round",
    "RoundClosed",
    "RoundItem",
    "SavedResult",
    "ScoreOutput",
    "ScoreResult",
    "ScorerInfo",
    "ScorerParam",
    "StateChanged",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "__version__",
    "embedded",
    "load_result",
]
