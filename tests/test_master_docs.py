"""The master's Swagger UI, loaded in headless Chromium with the network cut off."""

import shutil
import tempfile

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.test_master_api import start_master

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # no name resolves but loopback: a page that needed a CDN would not render
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--virtual-time-budget=10000",
]


class SwaggerUI(TestCase):
    timeout = 90

    async def render(self, url):
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            self.skipTest("chromium is not installed: apt-get install chromium")
        profile = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, profile, True)
        dom, _, code = await getProcessOutputAndValue(
            chromium, [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url])
        self.assertEqual(code, 0)
        return dom.decode()

    async def test_the_nodepass_dialect_docs_render_its_openapi_3_1_offline(self):
        master = await start_master(self, query="?np=/panel")
        page = await self.render(f"http://127.0.0.1:{master.port}/panel/v1/docs")
        for path in ("/panel/v1/instances", "/panel/v1/instances/{id}", "/panel/v1/tcping",
                     "/panel/v1/info", "/panel/v1/events"):
            self.assertIn(f'data-path="{path}"', page)
        self.assertIn("OAS 3.1", page)
        self.assertNotIn("Unable to render this definition", page)

    async def test_docs_render_every_route_offline(self):
        master = await start_master(self, prefix="/admin")
        page = await self.render(f"{master.base}/docs")
        for path in ("/admin/v1/instances", "/admin/v1/instances/{id}",
                     "/admin/v1/openapi.json", "/admin/v1/docs"):
            self.assertIn(f'data-path="{path}"', page)
        self.assertIn("authorize", page)  # the API key goes in through "Authorize"
        self.assertNotIn("Unable to render this definition", page)
