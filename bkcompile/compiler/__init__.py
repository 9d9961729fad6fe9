"""The compile side: the ``bk_dp`` backend entry, its options, the rule table's public view, the cost report and
``explain``. The graph passes themselves are ``bkcompile.passes``."""
