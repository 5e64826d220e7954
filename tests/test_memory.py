import subprocess
import sys

from b2p.memory import peak_rss_mb


def test_a_child_of_a_big_parent_reports_its_own_peak():
    big = bytearray(400 * 2**20)  # the parent touches 400 MB (bytearray zero-fills, so the pages are resident)
    assert peak_rss_mb() > 400
    r = subprocess.run([sys.executable, "-c", "from b2p.memory import peak_rss_mb; print(peak_rss_mb())"],
                       capture_output=True, text=True, check=True)
    assert float(r.stdout) < 200, r.stdout  # a bare python + numpy is tens of MB; ru_maxrss would say > 400
    del big
