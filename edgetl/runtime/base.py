"""The :class:`Runner` interface every inference backend implements (in the style of Polygraphy's runners).

A runner is built cheaply and loads its model lazily in :meth:`Runner.activate`; :meth:`Runner.infer`
takes a feed of NumPy arrays and returns the outputs as NumPy arrays, recording how long each call
took; :meth:`Runner.deactivate` frees the model. Runners are context managers::

    with OnnxRuntimeRunner("model.onnx") as runner:
        logits = runner.infer(images)["logits"]
        print(runner.last_inference_time())

All runners share one convention: the input is NCHW float32 named ``input``, the output ``logits``.
A bare array is fed to the model's only input, whatever its name.
"""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgetl.errors import ConfigError, EdgetlError

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class TensorSpec:
    """The name, shape and dtype of a model input or output.

    ``shape`` holds an int for a fixed dimension and a string (``"batch"``) or None for a dynamic one.
    """

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype

    def is_dynamic(self, axis: int) -> bool:
        """Whether dimension ``axis`` accepts any size."""
        return not isinstance(self.shape[axis], int)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": str(self.dtype)}


class Runner(abc.ABC):
    """Runs a model on one backend and times each inference.

    Subclasses implement :meth:`activate_impl`, :meth:`infer_impl`, :meth:`deactivate_impl` and
    :meth:`input_specs_impl`. ``infer`` times the whole call to ``infer_impl`` with
    :func:`time.perf_counter`: for a GPU backend ``infer_impl`` synchronises before returning, so
    the time includes the host-to-device and device-to-host copies an application would pay.
    """

    backend: str = "base"

    def __init__(self, name: str | None = None) -> None:
        self.name = name or self.backend
        self.is_active = False
        self.inference_times: list[float] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def activate(self) -> Runner:
        """Load the model (if not loaded yet) and make the runner ready to infer. Returns ``self``."""
        if self.is_active:
            log.debug("runner %s is already active", self.name)
            return self
        self.activate_impl()
        self.is_active = True
        return self

    def deactivate(self) -> None:
        """Free the model and any device memory. The recorded times are kept."""
        if not self.is_active:
            return
        try:
            self.deactivate_impl()
        finally:
            self.is_active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    # -- inference ---------------------------------------------------------------------------

    def input_specs(self) -> list[TensorSpec]:
        """The model's inputs (name, shape with dynamic dims as strings/None, dtype). Needs an active runner."""
        self._require_active("input_specs")
        return self.input_specs_impl()

    def infer(self, feed: dict[str, np.ndarray] | np.ndarray, check_inputs: bool = True) -> dict[str, np.ndarray]:
        """Run the model once and record the time it took.

        Args:
            feed: a dict of input name to array, or one array for a single-input model.
            check_inputs: check names, rank, fixed dimensions and dtype against the model first
                (float arrays of another precision are converted to the model's dtype).

        Returns:
            The outputs, by name (``logits`` for edgetl models), as NumPy arrays.

        Raises:
            ConfigError: the feed does not fit the model's inputs.
        """
        self._require_active("infer")
        feed = self._prepare_feed(feed, check_inputs)
        start = time.perf_counter()
        outputs = self.infer_impl(feed)
        self.inference_times.append(time.perf_counter() - start)
        return outputs

    def last_inference_time(self) -> float | None:
        """Seconds taken by the last :meth:`infer` call, or None before the first one."""
        return self.inference_times[-1] if self.inference_times else None

    def reset_times(self) -> None:
        """Forget the recorded inference times."""
        self.inference_times.clear()

    # -- helpers -----------------------------------------------------------------------------

    def _require_active(self, what: str) -> None:
        if not self.is_active:
            raise EdgetlError(
                f"runner {self.name} is not active; call activate() or use it as a context manager "
                f"before {what}()"
            )

    def _prepare_feed(self, feed: dict[str, np.ndarray] | np.ndarray, check: bool) -> dict[str, np.ndarray]:
        specs = self.input_specs_impl()
        if not isinstance(feed, dict):
            if len(specs) != 1:
                names = ", ".join(s.name for s in specs)
                raise ConfigError(f"the model has {len(specs)} inputs ({names}); pass a dict of arrays")
            feed = {specs[0].name: feed}
        if not check:
            return feed
        by_name = {s.name: s for s in specs}
        unknown = sorted(set(feed) - set(by_name))
        missing = sorted(set(by_name) - set(feed))
        if unknown or missing:
            raise ConfigError(
                f"feed names {sorted(feed)} do not match the model's inputs {sorted(by_name)}"
                + (f" (missing {missing})" if missing else "")
            )
        prepared: dict[str, np.ndarray] = {}
        for name, array in feed.items():
            spec = by_name[name]
            array = np.asarray(array)
            if array.ndim != len(spec.shape):
                raise ConfigError(
                    f"input '{name}' must have {len(spec.shape)} dimensions {_fmt_shape(spec.shape)}, "
                    f"got shape {list(array.shape)}"
                )
            for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):  # noqa: B905 (board: Python 3.8)
                if isinstance(want, int) and want > 0 and want != got:
                    raise ConfigError(
                        f"input '{name}' has a fixed size {want} on axis {axis} {_fmt_shape(spec.shape)}, "
                        f"got shape {list(array.shape)}; feed that size or re-export the model"
                    )
            if array.dtype != spec.dtype:
                if np.issubdtype(array.dtype, np.floating) and np.issubdtype(spec.dtype, np.floating):
                    array = array.astype(spec.dtype)
                else:
                    raise ConfigError(f"input '{name}' must be {spec.dtype}, got {array.dtype}")
            prepared[name] = np.ascontiguousarray(array)
        return prepared

    # -- to implement ------------------------------------------------------------------------

    @abc.abstractmethod
    def activate_impl(self) -> None:
        """Load the model and allocate what inference needs."""

    @abc.abstractmethod
    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference; return when the outputs are on the host."""

    @abc.abstractmethod
    def deactivate_impl(self) -> None:
        """Release the model and its memory."""

    @abc.abstractmethod
    def input_specs_impl(self) -> list[TensorSpec]:
        """Describe the inputs of the loaded model."""

    def __repr__(self) -> str:
        state = "active" if self.is_active else "inactive"
        return f"{type(self).__name__}(name={self.name!r}, {state})"


def _fmt_shape(shape: tuple[int | str | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
