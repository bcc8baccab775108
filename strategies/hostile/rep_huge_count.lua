-- string.rep of an empty string 2^40 times: no allocation, 2^40 iterations inside C.
return { plan = function(ctx)
    local s = string.rep('', 1 << 40)
    return { ports = ctx.ports }
end }
