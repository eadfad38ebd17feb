"""Design-space studies: the space of configurations, the resumable sweep over it (locally or
on Ray), and the report with its Pareto front."""
