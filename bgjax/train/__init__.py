"""Training: stages, the sharded train step, checkpoints and the loop (`bgjax train`)."""


class TrainingDiverged(RuntimeError):
    """A loss or gradient was not finite; the message names the step."""
