"""The front end: .sa text -> syntax tree (grammar.lark, syntax.py) -> IR definition (elaborate.py)."""
