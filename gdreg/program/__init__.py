"""The training program: config schema, experiment assembly, the loop and its run directory.

Reads the whole config and turns it into library calls (:mod:`.experiment`), runs the epochs
(:mod:`.loop`, :mod:`.epochs`, :mod:`.autotune`, :mod:`.analysis`), and owns everything a run
leaves on disk or needs from its surroundings (:mod:`.rundir`, :mod:`.checkpoint`,
:mod:`.summaries`, :mod:`.progress`, :mod:`.distributed`, :mod:`.supervisor`,
:mod:`.preemption`, :mod:`.cli`, :mod:`.exitcodes`). :mod:`.saved_run` reads a finished run back
for the tools.
"""
