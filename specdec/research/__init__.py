"""Research tools on top of the engine: trace-replay acceptance simulator (``trace``, ``simulate``,
``sim_estimate``), losslessness certificate (``certify``, ``pit``), cost model and automatic tree budget
(``cost_model``, ``auto_budget``)."""
