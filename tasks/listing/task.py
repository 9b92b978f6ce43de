"""The Prefect task around list_videos."""

from prefect import get_run_logger, task

from tasks.listing.config import ListingConfig, ManifestError
from tasks.listing.filters import Listing, list_videos
from tasks.runtime import retry_unless

retry_unless_manifest_error = retry_unless(ManifestError)


@task(name="list-videos", retries=2, retry_delay_seconds=30, retry_condition_fn=retry_unless_manifest_error)
def list_videos_task(manifest: str, config: ListingConfig | None = None) -> Listing:
    """List a manifest's videos and log the summary (retried, unless the manifest itself is unusable)."""
    listing = list_videos(manifest, config)
    summary = listing.summary
    dropped = {reason: count for reason, count in summary["dropped"].items() if count}
    get_run_logger().info(
        "listed %s: %d rows, %d kept, %d probed; dropped %s",
        summary["manifest"],
        summary["rows"],
        summary["kept"],
        summary["probed"],
        dropped or "none",
    )
    return listing
