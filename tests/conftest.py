import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

# Property tests judge keymount's answers, never the machine's speed. Hypothesis's
# per-example deadline and its too_slow health check (time spent generating data)
# fail on a loaded or shared 2-core machine, in CI and in `make test` alike, so this
# profile is the default everywhere; it keeps every strategy and example count.
# HYPOTHESIS_PROFILE=default brings back Hypothesis's own timing checks.
settings.register_profile("keymount", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "keymount"))
