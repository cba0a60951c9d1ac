"""The explanation half: units at three levels and their ids (:mod:`.units`), bases (:mod:`.bases`), the
activation store (:mod:`.store`, :mod:`.corpus`, :mod:`.capture`) and sparse autoencoders (:mod:`.sae`).
Imports only ``patching`` and ``graphs`` from this project."""
