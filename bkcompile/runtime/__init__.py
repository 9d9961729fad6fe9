"""The run time of the bk_dp graphs: the step ledger, clip states, the clip of a model in pieces, the graphs of one
backward, the checks between pieces. It imports neither the compile side (``bkcompile.compiler``) nor the passes:
what a graph needs when it runs is handed over when it is compiled (``bkcompile.plan.GraphPlan``)."""
