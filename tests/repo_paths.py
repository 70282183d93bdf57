"""Where things are, for tests in any folder under tests/."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
REAL_IMAGES = REPO.parent / "shared" / "real-images"   # ../shared/real-images beside the checkout
