"""Ops and owner dashboard (owned by the dashboard work; stub so the app can include it)."""

from fastapi import APIRouter

router = APIRouter()
