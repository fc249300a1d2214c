"""The embedded-model resolution lives in `model_assets` (below audio/ and llm_engine/, which use it too);
re-exported here for the server's callers."""

from model_assets import (  # noqa: F401
    RESOLVERS,
    STAGES,
    TURN_DIST,
    TURN_DIST_VERSION,
    TURN_FILE,
    Asset,
    MissingAssetError,
    describe_models,
    resolve_asr,
    resolve_llm,
    resolve_tts,
    resolve_turn,
    resolve_vad,
)
