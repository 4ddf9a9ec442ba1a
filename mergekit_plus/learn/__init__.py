"""Learning phases that run before the streaming merge: they read the inputs and the recipe's `data:`,
learn merge coefficients, and return the plan with those coefficients filled in."""
