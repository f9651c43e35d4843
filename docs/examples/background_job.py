import asyncio

from fastapi_concurrency_limiter import Limiter, Resource, ServerBusy

database_resource = Resource(2, name="db")
limiter = Limiter(timeout=5, resources=[database_resource])


async def run_query(n: int) -> int:
    await asyncio.sleep(0.05)  # stands for a query
    return n * n


async def job(n: int) -> int | None:
    try:
        async with limiter.acquire([database_resource]):  # at most 2 at a time
            return await run_query(n)
    except ServerBusy as busy:  # no slot within the limiter's timeout
        print(f"job {n}: {busy.reason}")
        return None


async def main() -> None:
    print(await asyncio.gather(*(job(n) for n in range(6))))


asyncio.run(main())
