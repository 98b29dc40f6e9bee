"""Built-in tool-needing tasks for offline demos: big-number arithmetic and invented-fact
multi-hop QA (see docs/tasks.md). `builtin.py` names them; the generators are `arithmetic.py`
and `multihop.py`."""
