"""Training objectives: losses return a dict whose ``loss`` entry is the total to backpropagate."""

from dynaneural.objectives.multi_exit import MultiExitLoss, exit_weights

__all__ = ["MultiExitLoss", "exit_weights"]
