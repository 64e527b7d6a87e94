"""Programs around finished runs: report, landscape, precision, bench (console scripts
``gdreg-report``, ``gdreg-landscape``, ``gdreg-precision``, ``gdreg-bench``)."""
