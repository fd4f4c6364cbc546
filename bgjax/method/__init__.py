"""The paper's method: category/personality branches, mask-guided attention, prompts, identifiers."""
