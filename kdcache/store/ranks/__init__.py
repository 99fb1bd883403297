"""A store written by K processes: who owns which whole chunks, and a rank's writer under rank
0's lock."""

__all__: list[str] = []
