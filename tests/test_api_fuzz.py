"""The master API fuzzed from its own openapi.json with schemathesis: no 5xx, and every
response — the error envelope included — matches the schema."""

import shutil

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.procs import clean_env, installed_script
from tests.test_master_api import KEY, start_master


class Schemathesis(TestCase):
    timeout = 240

    async def test_the_api_survives_its_own_schema(self):
        cli = installed_script("schemathesis") or shutil.which("schemathesis")
        if cli is None:
            self.skipTest("schemathesis is not installed: pip install '.[test]'")
        master = await start_master(self, query="?persist=0")
        out, err, code = await getProcessOutputAndValue(cli, [
            "run", f"{master.base}/openapi.json", "-H", f"X-API-Key: {KEY}",
            "--checks", "all",
            # a URL's meaning (ports, hosts, parameters) is more than JSON Schema can say,
            # so "schema-valid yet refused" is expected for made-up URLs
            "--exclude-checks", "positive_data_acceptance",
            "--max-examples", "6", "--seed", "1",
            "--exclude-path-regex", "events",  # a stream that never ends by design
        ], env=clean_env())
        report = out.decode() + err.decode()
        self.assertEqual(code, 0, report[-4000:])
        self.assertIn("Tested: 11", report)  # every route but the event stream
        self.assertEqual(master.count("Traceback"), 0)
