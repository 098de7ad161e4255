"""The node: receiver, spool, index, series tracker, rules, jobs, worker, dispatch, http, audit."""
