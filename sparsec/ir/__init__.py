"""The pattern IR: expressions, pattern nodes with their views, tilings; no lark, torch or triton."""
