"""A bug in the `openai` provider of a daemon under test, for what its log shows of it.

Python imports this at start-up when its directory is on PYTHONPATH. With
$CHINWAG_TEST_PROVIDER_BUG set, a model step for the model named ``buggy``
raises an unexpected error (not a ``ProviderError``: a bug) from a frame that
holds the provider's API key, as the SDK's own frames do while they build a
request; the run ends ``error`` 500 and the daemon logs ``run_crashed`` with
the traceback. Every other model is left alone.
"""

from __future__ import annotations

import os

if os.environ.get("CHINWAG_TEST_PROVIDER_BUG"):
    from collections.abc import AsyncGenerator

    from chinwag.daemon import _openai
    from chinwag.daemon._providers import Chunk, ModelRequest

    _real_stream = _openai.OpenAIProvider.stream

    async def _stream(
        self: _openai.OpenAIProvider, request: ModelRequest
    ) -> AsyncGenerator[Chunk, None]:
        if request.model != "buggy":
            async for chunk in _real_stream(self, request):
                yield chunk
            return
        api_key = self._client.api_key
        raise RuntimeError(f"an injected provider bug ({len(api_key)} characters of key at hand)")

    _openai.OpenAIProvider.stream = _stream  # type: ignore[method-assign]
