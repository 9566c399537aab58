"""rnnkern's music layer: folk-rnn ABC and Performance-RNN event tokenizers, a language model,
training, generation and a bundled folk model.

Modules are imported on use (``rnnkern.music.abc``, ``.performance``, ``.model``, ``.train``,
``.generate``, ``.cli``), so ``import rnnkern`` never needs music21 or pretty_midi.
"""
