"""Audio for voicefast: VAD, streaming ASR, incremental TTS, resampling and phone codecs (no torch).

  pcm.py          PCM16 <-> float32, ms <-> samples, FrameBuffer (re-buffer to fixed frames)
  codecs.py       G.711 mu-law / A-law (bit-exact, vectorized)
  resample.py     StreamResampler: stateful polyphase windowed-sinc between any two rates
  vad.py          VadParams, VadStateMachine (pure), SileroVadModel (shared ONNX), VadStream (per session)
  asr.py          WhisperASR (shared faster-whisper model, pooled/batched decodes), AsrOptions
  asr_pool.py     DecodePool: priority worker pool (finals before partials, queued finals batched)
  transcriber.py  StreamingTranscriber: paced append-only partials, speculative final
  wer.py          word_error_rate with number/email normalization
  tts.py          PiperTTS (shared voice)
  text_chunker.py TextChunker: LLM deltas -> speakable phrases, never split mid-token
  speech_out.py   SpeechOutput: phrases -> resampled frames + audio-ms -> text-offset map, cancel

Submodules are imported explicitly (`from audio.vad import VadStream`) so that importing one never loads
the others' native libraries."""
