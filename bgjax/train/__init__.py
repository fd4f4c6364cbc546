"""Training: stages, the sharded train step, checkpoints and the loop (`bgjax train`)."""


class TrainingDiverged(RuntimeError):
    """A loss or gradient was not finite; the message names the step. `state` is the train state of
    the last good step (on the devices), for inspection."""

    def __init__(self, message: str, step: int, state=None):
        super().__init__(message)
        self.step, self.state = step, state
