"""Operations on a platform through the remote agent (``agent.py``, shipped over SSH)."""
