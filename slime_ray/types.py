"""Sample, SampleStatus and the Arrow schema of a rollout batch.

A :class:`Sample` is one trajectory: a prompt, the engine's response token ids, the
per-token log-probs the engine sampled them with, the loss mask, the reward and the
weight version(s) of the policy that produced it. Field names follow slime's
``slime/utils/types.py`` so user plug-ins (custom generate / reward / filter functions)
carry over unchanged.

Token ids from the engine are kept as they are: model output is never decoded and
re-encoded.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa


class SampleStatus(str, enum.Enum):
    """Life-cycle of a Sample (slime's names).

    PENDING: not generated yet (or partially, see ``Sample.tokens``).
    COMPLETED: the engine stopped on an EOS / stop token (finish reason "stop").
    TRUNCATED: hit ``--rollout-max-response-len`` (finish reason "length").
    ABORTED: the request was aborted (finish reason "abort"); may be resumed.
    FAILED: a recoverable error (tool, reward function); never trained on.
    """

    PENDING = "pending"
    COMPLETED = "completed"
    TRUNCATED = "truncated"
    ABORTED = "aborted"
    FAILED = "failed"

    @classmethod
    def from_finish_reason(cls, reason: str) -> "SampleStatus":
        """Map an engine finish reason ("stop" / "length" / "abort") to a status."""
        return {"stop": cls.COMPLETED, "length": cls.TRUNCATED, "abort": cls.ABORTED}.get(
            reason, cls.FAILED
        )


@dataclass
class Sample:
    """One trajectory (prompt + response) and everything training needs from it.

    Attributes:
        index: global index of the sample (unique within a rollout).
        group_index: id of its group (the ``n_samples_per_prompt`` samples of one prompt).
            Advantages are normalised per ``group_index``, never by reshaping.
        prompt: the prompt as a string or as chat messages ``[{"role", "content"}, ...]``.
        label: the reference answer (any JSON value), passed to the reward function.
        metadata: free-form per-sample dict (from ``--metadata-key``).
        tokens: prompt token ids followed by response token ids, ``list[int]``.
        response: decoded response text (for rewards and logging only).
        response_length: number of response tokens (the tail of ``tokens``).
        loss_mask: ``list[int]`` of length ``response_length``; 1 = trained on, 0 = tool /
            observation tokens. ``None`` means all ones.
        rollout_log_probs: ``list[float]`` of length ``response_length``, the engine's
            log-prob of each response token at the rollout temperature (0.0 on tool tokens).
        reward: float, or dict of floats (select one with ``--reward-key``).
        status: a :class:`SampleStatus`.
        weight_versions: weight version(s) that generated the response; several for a
            partial rollout resumed after a weight update.
        token_weight_versions: ``list[int]`` of length ``response_length``: the weight version
            that produced each response token (-1 for tool / observation tokens). The
            staleness of a sample is judged by its oldest engine token.
        session_id: routing key that keeps a multi-turn session on one engine replica.
    """

    index: int = 0
    group_index: int = 0
    prompt: str | list[dict[str, Any]] = ""
    label: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)
    response: str = ""
    response_length: int = 0
    loss_mask: list[int] | None = None
    rollout_log_probs: list[float] | None = None
    reward: float | dict[str, float] | None = None
    status: SampleStatus = SampleStatus.PENDING
    weight_versions: list[int] = field(default_factory=list)
    session_id: str | None = None
    token_weight_versions: list[int] | None = None

    @property
    def weight_version(self) -> int | None:
        """The newest weight version that contributed tokens (None if not generated)."""
        return self.weight_versions[-1] if self.weight_versions else None

    @property
    def prompt_length(self) -> int:
        """Number of prompt tokens in ``tokens``."""
        return len(self.tokens) - self.response_length

    def get_loss_mask(self) -> list[int]:
        """The loss mask, defaulting to all ones over the response."""
        return list(self.loss_mask) if self.loss_mask is not None else [1] * self.response_length

    def append_response_tokens(
        self,
        token_ids: list[int],
        log_probs: list[float] | None,
        *,
        trainable: bool,
        weight_version: int | None = None,
        text: str = "",
    ) -> None:
        """Append response tokens (engine output or tool/observation tokens).

        Engine tokens are appended with ``trainable=True`` (mask 1, their log-probs);
        tool/observation tokens with ``trainable=False`` (mask 0, log-prob 0.0).

        Args:
            token_ids: ids to append, kept as given (never re-tokenised).
            log_probs: one float per id (required when trainable).
            trainable: whether the loss covers these tokens.
            weight_version: version of the weights that produced them (engine tokens).
            text: their text, appended to ``response``.

        Raises:
            ValueError: if ``log_probs`` is missing or of the wrong length for trainable tokens.
        """
        n = len(token_ids)
        if trainable and (log_probs is None or len(log_probs) != n):
            raise ValueError(
                f"append_response_tokens: {n} trainable tokens need {n} log-probs, got "
                f"{None if log_probs is None else len(log_probs)}"
            )
        mask = self.get_loss_mask()
        lps = list(self.rollout_log_probs or [0.0] * self.response_length)
        self.tokens = list(self.tokens) + list(token_ids)
        self.response_length += n
        self.loss_mask = mask + [1 if trainable else 0] * n
        self.rollout_log_probs = lps + (list(log_probs) if trainable else [0.0] * n)
        self.response += text
        tv = list(self.token_weight_versions or [-1] * (self.response_length - n))
        version = weight_version if (trainable and weight_version is not None) else -1
        self.token_weight_versions = tv + [version] * n
        if weight_version is not None and (
            not self.weight_versions or self.weight_versions[-1] != weight_version
        ):
            self.weight_versions = list(self.weight_versions) + [weight_version]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (status as its string value)."""
        d = asdict(self)
        d["status"] = self.status.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Sample":
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["status"] = SampleStatus(d.get("status", "pending"))
        return cls(**d)


# ----------------------------------------------------------------------------- Arrow
# Columns of a rollout batch. Free-form values (prompt as messages, label, metadata,
# dict rewards) are stored as JSON strings so the schema stays fixed.
ROLLOUT_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("group_index", pa.int64()),
        ("prompt_json", pa.string()),
        ("label_json", pa.string()),
        ("metadata_json", pa.string()),
        ("tokens", pa.list_(pa.int64())),
        ("response", pa.string()),
        ("response_length", pa.int64()),
        ("loss_mask", pa.list_(pa.int8())),
        ("rollout_log_probs", pa.list_(pa.float32())),
        ("reward_json", pa.string()),
        ("status", pa.string()),
        ("weight_versions", pa.list_(pa.int64())),
        ("session_id", pa.string()),
        ("token_weight_versions", pa.list_(pa.int64())),
    ]
)


def samples_to_arrow(samples: list[Sample]) -> pa.Table:
    """Pack samples into an Arrow table with :data:`ROLLOUT_SCHEMA`.

    ``loss_mask`` and ``rollout_log_probs`` are materialised (all ones / zeros when None).
    """
    cols: dict[str, list] = {name: [] for name in ROLLOUT_SCHEMA.names}
    for s in samples:
        cols["index"].append(s.index)
        cols["group_index"].append(s.group_index)
        cols["prompt_json"].append(json.dumps(s.prompt))
        cols["label_json"].append(json.dumps(s.label))
        cols["metadata_json"].append(json.dumps(s.metadata))
        cols["tokens"].append(list(s.tokens))
        cols["response"].append(s.response)
        cols["response_length"].append(s.response_length)
        cols["loss_mask"].append(s.get_loss_mask())
        cols["rollout_log_probs"].append(
            list(s.rollout_log_probs) if s.rollout_log_probs is not None else [0.0] * s.response_length
        )
        cols["reward_json"].append(json.dumps(s.reward))
        cols["status"].append(s.status.value)
        cols["weight_versions"].append(list(s.weight_versions))
        cols["session_id"].append(s.session_id)
        cols["token_weight_versions"].append(
            list(s.token_weight_versions) if s.token_weight_versions is not None else [-1] * s.response_length)
    return pa.Table.from_pydict(cols, schema=ROLLOUT_SCHEMA)


def samples_from_arrow(table: pa.Table) -> list[Sample]:
    """Inverse of :func:`samples_to_arrow` (log-probs come back as float32 values)."""
    out = []
    for row in table.to_pylist():
        out.append(
            Sample(
                index=row["index"],
                group_index=row["group_index"],
                prompt=json.loads(row["prompt_json"]),
                label=json.loads(row["label_json"]),
                metadata=json.loads(row["metadata_json"]),
                tokens=row["tokens"],
                response=row["response"],
                response_length=row["response_length"],
                loss_mask=row["loss_mask"],
                rollout_log_probs=row["rollout_log_probs"],
                reward=json.loads(row["reward_json"]),
                status=SampleStatus(row["status"]),
                weight_versions=row["weight_versions"],
                session_id=row["session_id"],
                token_weight_versions=row.get("token_weight_versions"),
            )
        )
    return out
