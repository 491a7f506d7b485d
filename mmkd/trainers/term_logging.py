"""Log every named loss term of a Trainer subclass on its own, averaged over steps and processes."""

from __future__ import annotations

from collections import defaultdict

import torch


class LossTermLoggingMixin:
    """Mix into a ``transformers.Trainer`` subclass (before ``Trainer``) and call :meth:`record_terms` from
    ``compute_loss``; every log line then carries ``loss_<term>``: the term's mean since the last log, averaged
    over processes."""

    def record_terms(self, terms: dict[str, torch.Tensor]) -> None:
        if not hasattr(self, "_term_sums"):
            self._term_sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.args.device))
            self._term_steps = 0
        for k, v in terms.items():
            self._term_sums[k] = self._term_sums[k] + v.detach().float()
        self._term_steps += 1

    def extra_logs(self) -> dict[str, float]:
        """Further figures for the next log line (override)."""
        return {}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Trainer calls log() on every process, so the mean over processes below is a matched collective.
        if getattr(self, "_term_steps", 0) and "loss" in logs:
            names = sorted(self._term_sums)
            stacked = torch.stack([self._term_sums[k] for k in names]) / self._term_steps
            stacked = self.accelerator.reduce(stacked, reduction="mean")
            for k, v in zip(names, stacked.tolist(), strict=True):
                logs[f"loss_{k}"] = round(v, 6)
            logs.update(self.extra_logs())
            self._term_sums.clear()
            self._term_steps = 0
        super().log(logs, start_time)
