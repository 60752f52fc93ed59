"""grpo_guard: the GRPO runs that learn nothing and say nothing, caught while they run.

Each round of rollouts gives three shares (GRPOLoss.signals). When one of them stays above
grpo_guard_threshold for grpo_guard_window rounds in a row, the run is not learning, and the guard
says the likely cause and the key to change (once per signal); `stop` also checkpoints and ends the run.
"""

from __future__ import annotations

from collections import deque

from r1tune.train.callbacks import Callback
from r1tune.ui import warn

CAUSES = {
    "frac_reward_zero_std": (
        "groups whose completions all got the same reward", "every advantage is 0, so nothing is learned: the "
        "task is too easy or too hard for the model, or the rewards cannot tell completions apart; raise "
        "num_generations or temperature, use a graded reward, or start from a model that solves some prompts"),
    "completions/clipped_ratio": (
        "completions cut at max_completion_length", "they end before an answer, so format and accuracy rewards "
        "see none; raise max_completion_length, add the 'length' reward, or set mask_truncated_completions"),
    "frac_reward_zero": (
        "completions with reward 0", "check that the reward functions read the right column (accuracy reads "
        "'answer' or 'solution') and expect what the template writes: an R1 template opens <think> in the "
        "prompt, so a format reward looking for '<think>' in the completion is always 0 (think_format knows)"),
}


class RolloutGuard(Callback):
    key = "grpo_guard"

    def __init__(self, stage, mode: str, window: int, threshold: float):
        self.stage, self.mode, self.window, self.threshold = stage, mode, window, threshold
        self.history = {name: deque(maxlen=window) for name in CAUSES}
        self.fired: set[str] = set()
        self.seen_round = -1

    def on_step_end(self, engine, step: int) -> None:
        if self.stage.round == self.seen_round:  # num_iterations > 1: the same rollouts as the last step
            return
        self.seen_round = self.stage.round
        for name, value in self.stage.signals.items():
            self.history[name].append(value)
            if name not in self.fired and self.stuck(name):
                self.fired.add(name)
                self.alarm(engine, step, name)

    def stuck(self, name: str) -> bool:
        values = self.history[name]
        return len(values) == self.window and min(values) > self.threshold

    def alarm(self, engine, step: int, name: str) -> None:
        what, why = CAUSES[name]
        message = (f"grpo_guard: for the last {self.window} rounds of rollouts (to step {step}) over "
                   f"{self.threshold:.0%} of {what} ({name} {self.history[name][-1]:.2f}): {why}")
        if self.mode == "stop":
            engine.request_stop(message + "; stopping (grpo_guard: stop)", checkpoint=True)
        else:
            warn(message)

    def state_dict(self) -> dict:
        return {"history": {k: list(v) for k, v in self.history.items()}, "fired": sorted(self.fired),
                "seen_round": self.seen_round}

    def load_state_dict(self, state: dict) -> None:
        for name, values in state["history"].items():
            self.history[name].extend(values)
        self.fired, self.seen_round = set(state["fired"]), state["seen_round"]
