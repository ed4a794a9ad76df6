"""Multitask curriculum: which task each training example teaches, and its condition mask.

Training draws a task per example from a curriculum, then turns the task into a
condition mask over the clip's real frames plus a text on/off flag (see DESIGN.md §1).
Three curricula:

- ``"uniform"``: every task equally likely.
- ``"linear"``: easy-to-hard. Each task has a static weight interpolated piecewise
  linearly over training progress ``p`` through ``p = 0, 0.5, 1``: generation tasks
  (i2v, it2v, t2v) 0.1 → 0.5 → 0.9, interpolation 0.9 → 0.5 → 0.1, prediction 0.7 → 0.5 → 0.3.
- ``"adaptive"`` (RDTF, arXiv 2503.17735): the linear static weight plus an adaptive part
  driven by the training loss. A PID controller tracks the loss's relative error against a
  reference (a fixed target or the running mean of past losses); its output is ranked against
  its own recent history and the percentile rank is cut into five levels. Level 2 is neutral;
  higher levels (loss rising) move weight toward the easy tasks (interpolation, prediction),
  lower levels (loss falling) toward the hard generation tasks.

Every weight vector is a distribution (non-negative, sums to 1, no task starved below a
floor), and every level 0..4 is reachable: a PID value above its whole history ranks 1.0
and maps to level 4. All randomness comes from the curriculum's own ``torch.Generator``,
so :meth:`TaskCurriculum.state_dict` resumes exactly. Under multi-process training feed
:meth:`TaskCurriculum.update` the same (gathered) loss on every process so they agree.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, NamedTuple

import torch

from rdtf.masks import TASK_USES_TEXT, TASKS, condition_mask, interpolation_mask, restrict_to_real_frames

CURRICULA: tuple[str, ...] = ("uniform", "linear", "adaptive")

#: Task family of each task; the static schedule and the adaptive shift act per family.
TASK_GROUP: dict[str, str] = {
    "i2v": "generation",
    "it2v": "generation",
    "t2v": "generation",
    "interpolation": "interpolation",
    "predict_forward": "prediction",
    "predict_backward": "prediction",
}
#: Families the adaptive part favours when the loss is high.
EASY_GROUPS: frozenset[str] = frozenset({"interpolation", "prediction"})

#: Static weight of each family at training progress p = 0, 0.5, 1 (piecewise linear between).
STATIC_SCHEDULE: dict[str, tuple[float, float, float]] = {
    "generation": (0.1, 0.5, 0.9),
    "interpolation": (0.9, 0.5, 0.1),
    "prediction": (0.7, 0.5, 0.3),
}

NUM_LEVELS = 5
NEUTRAL_LEVEL = 2
#: Smallest raw weight a task keeps under the adaptive shift, so no task is starved.
MIN_WEIGHT = 0.02
#: Decay of the running mean of the loss that the PID error is measured against.
LOSS_EMA_DECAY = 0.9
#: Interpolation strides the sampler draws from (every 2nd, 3rd or 4th frame given).
INTERPOLATION_STRIDES: tuple[int, ...] = (2, 3, 4)


class TaskSample(NamedTuple):
    """One training example's task: its name, condition mask ``(F,)`` and text flag."""

    task: str
    condition_mask: torch.Tensor
    use_text: bool


class TaskCurriculum:
    """Samples a task per training example and adapts the task mix over training.

    ``total_steps`` sets the progress scale of the static schedule (step ``total_steps - 1``
    is progress 1; later steps stay at 1). ``pid`` are (Kp, Ki, Kd); ``history`` the number
    of past PID values the current one is ranked against; ``target_loss`` replaces the
    running mean as the PID reference; ``integral_limit`` clamps the PID integral
    (anti-windup); ``adaptive_scale`` is the weight an extreme level adds to easy tasks
    and takes from generation tasks. ``text_dropout`` and ``first_frame_prob`` go to
    :func:`sample_condition`.
    """

    def __init__(
        self,
        kind: str = "uniform",
        *,
        tasks: tuple[str, ...] = TASKS,
        total_steps: int = 1,
        seed: int = 0,
        pid: tuple[float, float, float] = (5.0, 3.0, 1.3),
        history: int = 50,
        target_loss: float | None = None,
        integral_limit: float = 2.0,
        adaptive_scale: float = 0.3,
        text_dropout: float = 0.1,
        first_frame_prob: float = 0.8,
    ) -> None:
        if kind not in CURRICULA:
            raise ValueError(f"kind {kind!r}: expected one of {', '.join(CURRICULA)}")
        tasks = tuple(tasks)
        unknown = [t for t in tasks if t not in TASK_USES_TEXT]
        if not tasks or unknown or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks {tasks!r}: expected distinct names from {', '.join(TASKS)}")
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps}: must be >= 1")
        if len(pid) != 3 or not all(math.isfinite(g) for g in pid):
            raise ValueError(f"pid={pid!r}: expected three finite gains (Kp, Ki, Kd)")
        if history < 1:
            raise ValueError(f"history={history}: must be >= 1")
        if target_loss is not None and not (math.isfinite(target_loss) and target_loss > 0):
            raise ValueError(f"target_loss={target_loss}: must be a finite number > 0 or None")
        if not (math.isfinite(integral_limit) and integral_limit > 0):
            raise ValueError(f"integral_limit={integral_limit}: must be a finite number > 0")
        if not (math.isfinite(adaptive_scale) and adaptive_scale >= 0):
            raise ValueError(f"adaptive_scale={adaptive_scale}: must be a finite number >= 0")
        _check_probability("text_dropout", text_dropout)
        _check_probability("first_frame_prob", first_frame_prob)

        self.kind = kind
        self.tasks = tasks
        self.total_steps = int(total_steps)
        self.pid = tuple(float(g) for g in pid)
        self.target_loss = target_loss
        self.integral_limit = float(integral_limit)
        self.adaptive_scale = float(adaptive_scale)
        self.text_dropout = float(text_dropout)
        self.first_frame_prob = float(first_frame_prob)
        self.generator = torch.Generator().manual_seed(seed)
        self._history: deque[float] = deque(maxlen=history)
        self._level = NEUTRAL_LEVEL
        self._last_step: int | None = None
        self._loss_mean: float | None = None
        self._integral = 0.0
        self._prev_error: float | None = None

    @property
    def level(self) -> int:
        """Current adaptive level 0..4 (2 = neutral; always 2 for uniform and linear)."""
        return self._level

    def progress(self, step: int) -> float:
        """Training progress in [0, 1] at ``step``."""
        if step < 0:
            raise ValueError(f"step={step}: must be >= 0")
        return min(step / max(self.total_steps - 1, 1), 1.0)

    def weights(self, step: int) -> dict[str, float]:
        """Sampling probability of each task at ``step`` (sums to 1)."""
        p = self.progress(step)
        if self.kind == "uniform":
            raw = {t: 1.0 for t in self.tasks}
        else:
            raw = {t: _static_weight(TASK_GROUP[t], p) for t in self.tasks}
        if self.kind == "adaptive":
            shift = self.adaptive_scale * (self._level - NEUTRAL_LEVEL) / NEUTRAL_LEVEL
            raw = {
                t: max(w + (shift if TASK_GROUP[t] in EASY_GROUPS else -shift), MIN_WEIGHT)
                for t, w in raw.items()
            }
        total = sum(raw.values())
        return {t: w / total for t, w in raw.items()}

    def update(self, step: int, loss: float) -> None:
        """Feed the training loss of ``step``; steps must increase. Only ``adaptive`` reacts.

        The PID error is the loss's relative deviation from the reference, so the gains
        do not depend on the loss's scale; integral and derivative use the step gap.
        """
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"loss={loss} at step {step}: must be finite (check the training run for divergence)")
        if step < 0 or (self._last_step is not None and step <= self._last_step):
            raise ValueError(f"step={step}: must be >= 0 and greater than the last updated step {self._last_step}")
        dt = 1 if self._last_step is None else step - self._last_step
        self._last_step = step
        if self.kind != "adaptive":
            return

        if self._loss_mean is None:
            self._loss_mean = loss
        reference = self.target_loss if self.target_loss is not None else self._loss_mean
        error = (loss - reference) / max(abs(reference), 1e-8)
        self._integral = min(max(self._integral + error * dt, -self.integral_limit), self.integral_limit)
        derivative = 0.0 if self._prev_error is None else (error - self._prev_error) / dt
        self._prev_error = error
        kp, ki, kd = self.pid
        signal = kp * error + ki * self._integral + kd * derivative

        if self._history:
            self._level = _level_of_rank(_percentile_rank(signal, self._history))
        self._history.append(signal)
        self._loss_mean = LOSS_EMA_DECAY * self._loss_mean + (1.0 - LOSS_EMA_DECAY) * loss

    def sample_task(self, step: int) -> str:
        """Draw one task from :meth:`weights` with the curriculum's generator."""
        probs = torch.tensor(list(self.weights(step).values()), dtype=torch.float64)
        index = int(torch.multinomial(probs, 1, generator=self.generator))
        return self.tasks[index]

    def sample(self, step: int, loss_mask: torch.Tensor) -> TaskSample:
        """Draw a task and its condition for one example whose real frames are ``loss_mask``."""
        task = self.sample_task(step)
        mask, use_text = sample_condition(
            task,
            loss_mask,
            self.generator,
            text_dropout=self.text_dropout,
            first_frame_prob=self.first_frame_prob,
        )
        return TaskSample(task, mask, use_text)

    def sample_batch(self, step: int, loss_masks: torch.Tensor) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """:meth:`sample` per row of ``loss_masks`` ``(B, F)`` → tasks, masks ``(B, F)``, text flags ``(B,)``."""
        if loss_masks.ndim != 2:
            raise ValueError(f"loss_masks shape {tuple(loss_masks.shape)}: expected (B, F)")
        samples = [self.sample(step, row) for row in loss_masks]
        return (
            [s.task for s in samples],
            torch.stack([s.condition_mask for s in samples]),
            torch.tensor([s.use_text for s in samples]),
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically; plain JSON-serialisable values."""
        return {
            "kind": self.kind,
            "tasks": list(self.tasks),
            "generator": self.generator.get_state().tolist(),
            "history": list(self._history),
            "level": self._level,
            "last_step": self._last_step,
            "loss_mean": self._loss_mean,
            "integral": self._integral,
            "prev_error": self._prev_error,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output into a curriculum built with the same kind and tasks."""
        if state.get("kind") != self.kind or tuple(state.get("tasks", ())) != self.tasks:
            raise ValueError(
                f"curriculum state for kind={state.get('kind')!r}, tasks={state.get('tasks')!r} "
                f"does not match this curriculum (kind={self.kind!r}, tasks={list(self.tasks)!r})"
            )
        level = int(state["level"])
        if not 0 <= level < NUM_LEVELS:
            raise ValueError(f"curriculum state level={level}: must be in [0, {NUM_LEVELS})")
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self._history.clear()
        self._history.extend(float(v) for v in state["history"])
        self._level = level
        self._last_step = state["last_step"]
        self._loss_mean = state["loss_mean"]
        self._integral = float(state["integral"])
        self._prev_error = state["prev_error"]


def sample_condition(
    task: str,
    loss_mask: torch.Tensor,
    generator: torch.Generator,
    *,
    text_dropout: float = 0.1,
    first_frame_prob: float = 0.8,
) -> tuple[torch.Tensor, bool]:
    """Random condition mask ``(F,)`` for ``task`` on the real frames of ``loss_mask``, and the text flag.

    The task's parameters are drawn relative to the ``n`` real frames (``loss_mask == 1``,
    anywhere in the clip), so padding is never given and a short clip still gets its task:

    - i2v / it2v: one real frame, the first with probability ``first_frame_prob``,
      otherwise a uniformly drawn later one.
    - t2v: nothing given.
    - interpolation: stride from 2..4 and an offset, both chosen so at least two real frames
      are given (needs ``n >= 3``); a 2-frame clip gives one of its two frames.
    - prediction: a prefix (forward) or suffix (backward) of 1..n-1 real frames.

    Fallback: a single-frame clip (``n == 1``) cannot leave a frame to generate, so every
    image task gives its only frame (the example then teaches reconstruction); t2v is
    unaffected. The text flag is the task's (``TASK_USES_TEXT``), dropped with probability
    ``text_dropout`` for classifier-free guidance.
    """
    if task not in TASK_USES_TEXT:
        raise ValueError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    _check_probability("text_dropout", text_dropout)
    _check_probability("first_frame_prob", first_frame_prob)
    real = _real_frame_indices(loss_mask)
    n = len(real)

    if task == "t2v":
        local = torch.zeros(n)
    elif n == 1:
        local = torch.ones(1)
    elif task in ("i2v", "it2v"):
        first = _uniform(generator) < first_frame_prob
        local = condition_mask(task, n, position=0 if first else _randint(generator, 1, n))
    elif task == "interpolation":
        if n >= 3:
            strides = [s for s in INTERPOLATION_STRIDES if s < n]
            stride = strides[_randint(generator, 0, len(strides))]
            offset = _randint(generator, 0, min(stride, n - stride))  # keeps >= 2 given frames
        else:
            stride, offset = 2, _randint(generator, 0, 2)
        local = interpolation_mask(n, stride, offset)
    else:
        local = condition_mask(task, n, num_given=_randint(generator, 1, n))

    mask = torch.zeros(loss_mask.shape[0], device=loss_mask.device)
    mask[real] = local.to(mask.device)
    use_text = TASK_USES_TEXT[task] and not (_uniform(generator) < text_dropout)
    return restrict_to_real_frames(mask, loss_mask.to(mask.dtype)), use_text


def _static_weight(group: str, progress: float) -> float:
    start, middle, end = STATIC_SCHEDULE[group]
    if progress <= 0.5:
        return start + (middle - start) * progress / 0.5
    return middle + (end - middle) * (progress - 0.5) / 0.5


def _percentile_rank(value: float, history: deque[float]) -> float:
    """Share of ``history`` below ``value``, ties counted half: 0 below all, 1 above all."""
    below = sum(1 for h in history if h < value)
    equal = sum(1 for h in history if h == value)
    return (below + 0.5 * equal) / len(history)


def _level_of_rank(rank: float) -> int:
    return min(int(rank * NUM_LEVELS), NUM_LEVELS - 1)


def _real_frame_indices(loss_mask: torch.Tensor) -> torch.Tensor:
    if loss_mask.ndim != 1 or loss_mask.numel() == 0:
        raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)}: expected (F,) with F >= 1")
    values = loss_mask.float()
    if not torch.all((values == 0) | (values == 1)):
        raise ValueError(f"loss_mask {values.tolist()}: entries must be 0 (padding) or 1 (real frame)")
    real = torch.nonzero(values, as_tuple=False).flatten()
    if real.numel() == 0:
        raise ValueError("loss_mask has no real frame (all zeros): nothing to condition on or learn from")
    return real


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    return int(torch.randint(low, high, (1,), generator=generator))


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value}: must be a probability in [0, 1]")
