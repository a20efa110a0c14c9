"""Tests of scripts/foreign: the runner of httpx's and aiohttp's own suites."""
