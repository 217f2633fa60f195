"""The FirecREST v2 subset of ``sshq serve``, mounted under ``/firecrest``."""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["router"]

router = APIRouter()
