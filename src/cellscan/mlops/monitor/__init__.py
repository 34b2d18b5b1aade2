"""Monitoring: what arrives on the line, compared with what each model version was registered with.

- :mod:`.descriptors`: per-image intensity descriptors and a compact model embedding (numpy only);
- :mod:`.predlog`: the prediction log (SQLAlchemy: sqlite in the project by default, any URL), kept images
  with a retention, and batch / day metrics read back from it;
- :mod:`.reference`: each registered version's reference (its validation normals' descriptors, embedding
  and scores), an MLflow artifact of the version's run;
- :mod:`.drift`: Evidently 0.7 drift reports with tests, saved as HTML + JSON and logged to MLflow.
"""
